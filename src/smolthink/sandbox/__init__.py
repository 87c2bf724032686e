"""Sandboxed execution of reasoning-gym's own task scorers.

Several reasoning-gym scorers run the model's answer through Python `eval` (binary_matrix, spiral_matrix,
string_insertion, n_queens) or through `sympy.parse_expr`, which also evals (countdown, puzzle24). Under RL pressure
a model finds strings that run code (`__import__('os').system(...)`), hang (`9**9**9`) or exhaust memory.
propositional_logic and syllogism parse by hand and never eval, but go through the same sandbox.

`Scorer` therefore never runs a scorer in the caller's process:

    caller (Scorer) --pipe--> worker (a fresh `python -c` interpreter, persistent; imports paid once)
                                 `--fork--> one short-lived process per answer, sandboxed, runs score_answer

  policy.py   what a scoring process may and may not do (audit hook, seccomp filter, rlimits)
  worker.py   the fork server: one sandboxed child per answer, a timeout, pipe framing
  client.py   `Scorer`, which starts, feeds, restarts and kills the workers

Results are (task_score, error): error None for a normal score, else "timeout", "crashed: ...",
"error: <ExcType>: <message>" (a scorer exception or a SandboxViolation) with score 0.0.
"""
from .client import DEFAULT_TIMEOUT_S, Scorer
from .policy import SandboxViolation

__all__ = ["DEFAULT_TIMEOUT_S", "Scorer", "SandboxViolation"]
