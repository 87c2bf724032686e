"""Data parallelism across the processes that `torchrun` or `accelerate launch` start: which share of the work this
process does, and the few collectives the training loops need, all through accelerate's process state. On one
process every function is the identity and no collective runs, so a one-process run is the run it always was.

How N processes equal one process with the whole batch:

* every process holds the same plan: the questions of each rollout batch, the whole experience buffer, the
  minibatches of each optimizer step (the same seeds on every process, results gathered to every process);
* a process does its share of the work: `share` (a contiguous slice of a rollout batch's questions, so each group
  and its advantages live on one process; of the buffer, for old log-probs), `rows` (every N-th row of each
  minibatch of a step);
* losses are normalised by the whole step's sequence / token counts (known to every process from the plan), so
  the processes' losses add up to the one-process loss, and `sum_gradients` adds their gradients (one all-reduce
  per optimizer step, before clipping), so each process steps with the one-process gradient.

DDP is not used: its reducer only runs when the forward goes through the DDP wrapper, and the log-prob path calls
the decoder body and the LM head directly (no [N, T, V] logits), so the wrapper would average nothing. A process
may also run a different number of forward chunks than another in a step (chunks are cut by token budget), which
DDP's per-backward all-reduce cannot allow; one explicit sum per step can.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence, TypeVar

import torch

from .seeds import derive_seed

T = TypeVar("T")


@functools.lru_cache(maxsize=1)
def state():
    """accelerate's process state (its process group is created on first use: gloo on CPU, nccl on GPUs). Created
    here first with the device decided as `harness.build_context`'s Accelerator decides it, because accelerate
    keeps the first one."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    """This process's index (0 on one process)."""
    return state().process_index


def world() -> int:
    """The number of processes."""
    return state().num_processes


def is_main() -> bool:
    """True on the process that writes the run directory (process 0)."""
    return state().is_main_process


def barrier() -> None:
    """Wait until every process gets here."""
    state().wait_for_everyone()


def process_seed(seed: int) -> int:
    """This process's seed for a stream drawn separately by each process (rollout sampling): the shared seed itself
    on one process, so one-process runs keep their seeds."""
    return seed if world() == 1 else derive_seed(seed, "rank", rank())


def share(items: Sequence[T]) -> list[T]:
    """This process's contiguous slice of `items` (sizes differ by at most one; all of them on one process)."""
    n, r, w = len(items), rank(), world()
    return list(items[r * n // w : (r + 1) * n // w])


def rows(minibatches: list[list[int]]) -> list[list[int]]:
    """This process's rows of each minibatch of a step: every N-th row from row `rank` (strided, so length-sorted
    minibatches give every process similar lengths); minibatches left empty are dropped."""
    mine = [mb[rank() :: world()] for mb in minibatches]
    return [mb for mb in mine if mb]


def gather_lists(*lists: list) -> tuple[list, ...]:
    """Each list concatenated over the processes in rank order (one collective for all of them); on one process the
    lists themselves. Their items must pickle (CPU tensors do)."""
    if world() == 1:
        return lists
    from accelerate.utils import gather_object

    got = gather_object([lists])  # one tuple of lists per process, rank order
    return tuple([x for per in got for x in per[i]] for i in range(len(lists)))


def from_main(fn: Callable[[], T]) -> T:
    """Run `fn` on process 0 only (a write to the run directory, an eval) and hand its result to every process; the
    others wait for it."""
    if world() == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [fn() if is_main() else None]
    return broadcast_object_list(box)[0]


def any_process(flag: bool) -> bool:
    """True when `flag` is true on any process (so all of them take the same branch)."""
    if world() == 1:
        return flag
    from accelerate.utils import reduce

    return bool(reduce(torch.tensor([float(flag)], device=state().device), reduction="max").item())


def sum_gradients(params: Sequence[torch.Tensor]) -> None:
    """Replace every parameter's gradient with its sum over the processes (one all-reduce of all of them, flat); a
    process that ran no row this step adds zeros."""
    if world() == 1:
        return
    from accelerate.utils import reduce

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")  # [all trainable numbers]
    start = 0
    for p in params:
        p.grad = flat[start : start + p.numel()].view_as(p)
        start += p.numel()


def fold(totals: dict[str, float], key: str, value: float, weight: float = 1.0) -> None:
    """Fold one part's stat into the totals of a step (parts: forward chunks, then processes): a key ending in /min
    keeps the minimum, /max the maximum, any other adds value x weight (a sum, or a weighted mean when the weights
    add up to 1 over the step)."""
    if key.endswith("/min"):
        totals[key] = min(totals.get(key, float("inf")), value)
    elif key.endswith("/max"):
        totals[key] = max(totals.get(key, float("-inf")), value)
    else:
        totals[key] = totals.get(key, 0.0) + value * weight


def merge(totals: dict[str, float]) -> dict[str, float]:
    """Every process's step totals folded into the step's (see `fold`); a process that ran no row adds nothing."""
    if world() == 1:
        return totals
    merged: dict[str, float] = {}
    for part in gather_lists([totals])[0]:
        for key, value in part.items():
            fold(merged, key, value)
    return merged
