"""Warm-up SFT: loss masks, learning, exact resume through a real SIGTERM, and every artifact of a run."""
import json
import os
import signal

import pytest
import torch

from smolthink.chat import SYSTEM_PROMPT
from smolthink.config import SFTConfig, build_config
from smolthink.errors import Stopped
from smolthink.train_sft import build_experiences, tokenize_messages, train_sft

FAST = {"threads": 2, "eval.n": 0, "minibatch_size": 4, "warmup_steps": 1, "log_every": 1, "max_length": 512}


def cfg_for(tiny_dir, traces=None, **kw):
    return build_config(SFTConfig, [{"model": str(tiny_dir), **FAST, **kw},
                                    {"data.path": str(traces)} if traces else {}])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_mask_is_exactly_the_assistant_turn_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    answer = "<think> All A are B, all B are C, so all A are C. </think> <answer>Yes</answer>"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Does it follow?"},
                {"role": "assistant", "content": answer}]
    prompt, completion = tokenize_messages(tok, messages)
    assert completion[-1] == tok.eos_token_id == tok.pad_token_id  # pad == eos: masks must come from lengths
    exps, stats = build_experiences(tok, [{"messages": messages}], max_length=1024)
    from smolthink.buffer import ExperienceBuffer

    buf = ExperienceBuffer()
    buf.extend(exps + exps[:1])
    buf.items[1] = type(exps[0])(prompt_ids=prompt + [5, 6, 7], completion_ids=completion, old_logp=None,
                                 advantage=0.0, reward=0.0)  # a longer row so row 0 gets padded
    batch = buf.collate([0, 1], tok.pad_token_id)
    row = batch.input_ids[0]
    assert int(batch.attention_mask[0].sum()) == len(prompt) + len(completion) < batch.input_ids.shape[1]
    on = batch.completion_mask[0].bool()
    assert tok.decode(row[on]) == answer + "<|im_end|>"
    assert tok.decode(row[: len(prompt)]).endswith("<|im_start|>assistant\n")
    assert not on[: len(prompt)].any() and not on[len(prompt) + len(completion):].any()  # padding (== eos) off
    # too-long sequences are dropped and counted; held-out questions are dropped and counted
    _, s = build_experiences(tok, [{"messages": messages}], max_length=len(prompt) + len(completion) - 1)
    assert s["used"] == 0 and s["dropped_too_long"] == 1
    _, s = build_experiences(tok, [{"messages": messages}], max_length=1024, exclude_questions=["Does it follow?"])
    assert s["used"] == 0 and s["dropped_eval_overlap"] == 1


def test_sft_lowers_the_loss_on_its_data(tmp_path, tiny_dir, traces):
    out = tmp_path / "run"
    train_sft(cfg_for(tiny_dir, traces, num_epochs=4, learning_rate=1e-2, use_lora=False,
                      lr_scheduler_type="constant"), out)
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    losses = [r["loss/sft"] for r in rows]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2  # the same 8 traces in both epochs
    assert last < first - 1.0, losses
    for key in ("loss/sft", "lr", "grad_norm", "perf/train_s", "perf/train_tok_s", "perf/peak_rss_gb", "epoch"):
        assert key in rows[0]


def test_resume_after_sigterm_is_exact(tmp_path, tiny_dir, traces):
    """4 steps straight == SIGTERM after step 2 (graceful stop + checkpoint), then resume for 2 (cosine lr,
    warm-up, gradient accumulation and an epoch boundary in between)."""
    cfg = cfg_for(tiny_dir, traces, max_steps=4, minibatch_size=2, gradient_accumulation_steps=2,
                  learning_rate=1e-3)
    straight, split = tmp_path / "a", tmp_path / "b"
    train_sft(cfg, straight)

    def sigterm_at_2(step, m):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Stopped):
        train_sft(cfg, split, on_step=sigterm_at_2)
    assert (split / "checkpoints" / "step_000002").is_dir() and not (split / "DONE").exists()
    assert train_sft(cfg, split, resume=True) is not None
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]
    a, b = strip(metrics(straight)), strip(metrics(split))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss/sft"] for r in a] == [r["loss/sft"] for r in b]
    assert a == b


def test_sigterm_during_the_final_eval_finishes_the_run_then_stops(tmp_path, tiny_dir, traces, monkeypatch):
    """A signal that lands after the last step's check (here: during the final eval) must not be swallowed: the
    run still finishes (final model, DONE), and then Stopped tells the caller (e.g. the pipeline) to go no further."""
    import smolthink.harness

    real_eval = smolthink.harness.run_eval

    def eval_hit_by_sigterm(ctx, step):
        if step == 2:  # the final eval, not the one at step 0
            os.kill(os.getpid(), signal.SIGTERM)
        return real_eval(ctx, step)

    monkeypatch.setattr(smolthink.harness, "run_eval", eval_hit_by_sigterm)
    out = tmp_path / "run"
    with pytest.raises(Stopped, match="SIGTERM arrived after the last step") as stopped:
        train_sft(cfg_for(tiny_dir, traces, max_steps=2, **{"eval.n": 2}), out)
    assert stopped.value.signum == signal.SIGTERM
    assert json.loads((out / "DONE").read_text())["steps"] == 2 and (out / "final" / "adapter").is_dir()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone again


def test_time_budget_stops_between_steps(tmp_path, tiny_dir, traces, monkeypatch):
    """max_seconds is checked between optimizer steps on the loop's clock (a fake one here: 10 s per step), and
    the seconds spent are checkpointed so a resumed run continues the same budget."""
    from types import SimpleNamespace

    import smolthink.train_sft as train_sft_module

    clock = [1000.0]
    monkeypatch.setattr(train_sft_module, "time", SimpleNamespace(time=lambda: clock[0]))

    def tick(step, m):
        clock[0] += 10.0

    out = tmp_path / "run"
    train_sft(cfg_for(tiny_dir, traces, num_epochs=100, max_seconds=25.0), out, on_step=tick)
    assert json.loads((out / "DONE").read_text())["steps"] == 3  # 0, 10, 20 s: under 25; 30 s: stop
    # step 3 ended at 20 s on the loop's clock (the fake clock moves after the step): that is what a resume continues
    assert json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())["seconds"] == 20.0


def test_smoke_writes_every_artifact(tmp_path, tiny_dir, monkeypatch):
    """No data given: scripted traces are generated first (eval questions excluded), then 2 steps with eval."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from smolthink.cli import main
    from smolthink.models import load_model

    import time

    out = tmp_path / "run"
    args = ["sft", "--model", str(tiny_dir), "--out", str(out)]
    for s in ["max_steps=2", "data.num_traces=6", "eval.n=2", "eval.max_new_tokens=4", "minibatch_size=3",
              "threads=2"]:
        args += ["--set", s]
    t0 = time.time()
    assert main(args) == 0
    wall = time.time() - t0
    for p in ("config.yaml", "metrics.jsonl", "traces.jsonl", "data_stats.json", "eval/step_000000.json",
              "eval/step_000000.completions.jsonl", "eval/step_000002.json", "checkpoints/step_000002/state.json",
              "final/adapter/adapter_config.json", "final/merged/config.json", "DONE"):
        assert (out / p).exists(), p
    assert [r["step"] for r in metrics(out)] == [1, 2]
    done = json.loads((out / "DONE").read_text())  # one meaning: wall seconds and optimizer steps
    assert done["steps"] == 2 and 0 < done["seconds"] <= wall + 0.1
    assert json.loads((out / "eval" / "step_000002.json").read_text())["n"] == 2
    trained = {json.loads(line)["question"] for line in (out / "traces.jsonl").read_text().splitlines()}
    assert len(trained) == 6
    eval_q = {json.loads(line)["question"] for line in
              (out / "eval" / "step_000000.completions.jsonl").read_text().splitlines()}
    assert not trained & eval_q
    assert "traces.jsonl" in (out / "config.yaml").read_text()  # a resume finds the same data
    model, _ = load_model(str(out / "final" / "merged"))  # what `smolthink train --model <dir>` loads
    assert model.config.vocab_size > 0
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out / "final" / "adapter")
    # an existing run is not overwritten by accident
    assert main(["sft", "--model", str(tiny_dir), "--out", str(out)]) == 2


def test_accumulated_gradient_equals_the_big_batch(tiny_lm, tiny_tokenizer, traces):
    """Loss normalised by the whole step's assistant tokens: 2 micro-batches of 2 == 1 batch of 4 (gradients)."""
    from smolthink.buffer import ExperienceBuffer
    from smolthink.data import load_traces
    from smolthink.packing import PaddedChunks
    from smolthink.train_sft import sft_loss

    exps, _ = build_experiences(tiny_tokenizer, load_traces(traces)[:4], max_length=1024)
    buf = ExperienceBuffer()
    buf.extend(exps)
    n_tok = sum(len(e.completion_ids) for e in exps)
    params = [p for p in tiny_lm.parameters() if p.requires_grad]

    padded = PaddedChunks(0, tiny_tokenizer.pad_token_id)

    def grads(groups):
        tiny_lm.zero_grad(set_to_none=True)
        for g in groups:
            sft_loss(tiny_lm, padded, buf.collate(g, tiny_tokenizer.pad_token_id), n_tok)[0].backward()
        return [p.grad.clone() for p in params]

    big, small = grads([[0, 1, 2, 3]]), grads([[0, 1], [2, 3]])
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(big, small))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shared_prefix_keeps_the_loss_and_gradients(tiny_lm, tiny_tokenizer, traces, lora):
    """Real chat-templated traces, each chunk's common prompt prefix (the system turn and the user turn's opening)
    run once into a KV cache and the rest of each trace on top: the same loss and gradients (LoRA A and B, or
    every weight) as the whole sequences in one batch, in one chunk or accumulated over several."""
    from smolthink.buffer import ExperienceBuffer
    from smolthink.data import load_traces
    from smolthink.models import attach_lora
    from smolthink.packing import PaddedChunks, SharedChunks
    from smolthink.train_sft import sft_loss

    exps, _ = build_experiences(tiny_tokenizer, load_traces(traces), max_length=1024)
    buf = ExperienceBuffer()
    buf.extend(exps)
    idx = list(range(len(exps)))
    p = buf.common_prefix_len(idx)
    assert SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n" in tiny_tokenizer.decode(exps[0].prompt_ids[:p])
    model = tiny_lm
    if lora:
        model = attach_lora(tiny_lm, r=4, alpha=8)
        with torch.no_grad():  # lora_B starts at 0, which would leave lora_A without a gradient
            for name, q in model.named_parameters():
                if "lora_B" in name:
                    q.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    named = [(name, q) for name, q in model.named_parameters() if q.requires_grad]
    assert any("lora_A" in name for name, _ in named) == lora
    n_tok = sum(len(e.completion_ids) for e in exps)

    def step(packing, minibatches):
        model.zero_grad(set_to_none=True)
        total, chunks = 0.0, packing.chunks(buf, minibatches)
        for c in chunks:
            loss, _ = sft_loss(model, packing, packing.collate(buf, c, "cpu"), n_tok)
            loss.backward()
            total += loss.item()
        return total, len(chunks), [q.grad.clone() for _, q in named]

    loss, n_chunks, grads = step(PaddedChunks(0, tiny_tokenizer.pad_token_id), [idx])
    assert n_chunks == 1
    # (budget, minibatches, chunks): one chunk; one row per chunk; a budget that cuts the batch (None: > 1 chunk);
    # two minibatches accumulated
    for budget, minibatches, want in ((0, [idx], 1), (1, [idx], len(idx)), (600, [idx], None),
                                      (0, [idx[:5], idx[5:]], 2)):
        s_loss, s_chunks, s_grads = step(SharedChunks(budget, tiny_tokenizer.pad_token_id, by_prompt=False),
                                         minibatches)
        assert (s_chunks == want) if want else (s_chunks > 1), (budget, s_chunks)
        assert abs(s_loss - loss) <= 1e-5 * loss, (budget, s_loss, loss)
        for (name, _), a, b in zip(named, s_grads, grads):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), (budget, name, (a - b).abs().max())


def test_share_prefix_keeps_the_steps(tmp_path, tiny_dir, traces):
    """share_prefix on and off train the same steps (allclose); on, the step computes fewer tokens than the
    traces hold (the common prefix once per chunk)."""
    rows = {}
    for share in (True, False):
        out = tmp_path / str(share)
        train_sft(cfg_for(tiny_dir, traces, max_steps=3, learning_rate=1e-3, max_tokens_per_forward=600,
                          share_prefix=share), out)
        rows[share] = metrics(out)
    assert len(rows[True]) == 3
    for a, b in zip(rows[True], rows[False]):
        for k in ("loss/sft", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])), (k, a, b)
        assert a["perf/train_computed_tok_s"] < 0.8 * a["perf/train_tok_s"]
        assert b["perf/train_computed_tok_s"] == b["perf/train_tok_s"]
