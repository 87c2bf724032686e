"""Warm-up traces: every kept trace verified by the reward's strict scoring, rejections counted, eval questions
excluded, the local-teacher and API paths end to end (tiny model, real local server)."""
import json
import threading

import pytest

from smolthink.chat import SYSTEM_PROMPT
from smolthink.config import DataConfig
from smolthink.data import make_traces, stats_path_for, verify
from smolthink.errors import SmolthinkError
from smolthink.tasks import make_examples, parse_tasks, reference_answer

BOTH = "syllogism,propositional_logic"


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scripted_traces_verify_and_a_wrong_one_is_rejected(tmp_path):
    from datasets import load_dataset

    from smolthink import solvers

    specs = parse_tasks(BOTH)
    n = 8
    # the train questions make_traces would pick; ban two of them as if they were eval questions
    would_pick = make_examples(specs, n, 0, "train", balanced=True)
    banned = [would_pick[0].question, would_pick[1].question]
    out = tmp_path / "traces.jsonl"
    stats = make_traces(DataConfig(num_traces=n), specs, 0, out, exclude_questions=banned)
    # the solvers decline items they cannot derive (reasoning-gym mislabels some syllogisms): those are the only
    # rejections, every trace they do write verifies, and top-up rounds replace the declined questions
    assert stats["requested"] == n and stats["kept"] == n, stats
    assert stats["questions"] == stats["kept"] + stats["rejected"]
    assert stats["rejected_by_reason"]["wrong"] == stats["rejected_by_reason"]["format"] == 0
    assert stats["rejected"] == stats["rejected_by_reason"]["no_trace"]
    assert stats["rejection_rate"] == pytest.approx(stats["rejected"] / stats["questions"])
    assert {t: v["kept"] for t, v in stats["by_task"].items()} == {"syllogism": n // 2, "propositional_logic": n // 2}
    assert json.loads(stats_path_for(out).read_text())["kept"] == n
    rows = rows_of(out)
    assert len(rows) == n and not {r["question"] for r in rows} & set(banned)
    assert len({r["question"] for r in rows}) == n
    syl = [r["answer"] for r in rows if r["task"] == "syllogism"]
    assert syl.count("Yes") == syl.count("No")  # balanced answer classes (the natural split is ~2:1 Yes)
    for r in rows:
        assert r["source"] == "scripted"
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["messages"][0]["content"] == SYSTEM_PROMPT and r["messages"][1]["content"] == r["question"]
    ds = load_dataset("json", data_files=str(out), split="train")
    assert len(ds) == n and ds[0]["messages"][2]["role"] == "assistant"

    # the same run with the first written trace's answer corrupted: rejected as "wrong", never written
    first = {}

    def corrupt_first(task, entry, rng):
        trace = solvers.solve(task, entry, rng)
        if trace is not None and not first:
            first["q"] = entry["question"]
            trace = trace.rpartition("<answer>")[0] + "<answer>Perhaps</answer>"
        return trace

    out2 = tmp_path / "traces2.jsonl"
    stats2 = make_traces(DataConfig(num_traces=n, top_up_rounds=0), specs, 0, out2, exclude_questions=banned,
                         solver=corrupt_first, stats_path=tmp_path / "s.json")
    assert stats2["rejected_by_reason"]["wrong"] == 1 and stats2["rejected_by_reason"]["format"] == 0
    assert stats2["rejected"] == stats2["rejected_by_reason"]["no_trace"] + 1
    assert stats2["kept"] + stats2["rejected"] == stats2["questions"] == n
    assert first["q"] not in {r["question"] for r in rows_of(out2)}
    assert json.loads((tmp_path / "s.json").read_text())["rejected"] == stats2["rejected"]


def test_traces_from_an_easier_setting_of_the_task(tmp_path):
    """`data.task` sets where the traces' questions come from (here syllogisms without "Some ... are not"), while
    the eval questions of the run's task stay excluded; without it the traces follow the run's task."""
    from smolthink.config import build_config, PipelineConfig
    from smolthink.data import trace_specs
    from smolthink.evaluate import eval_examples

    easy = [{"name": "syllogism", "config": {"allow_some_not": False}}]
    cfg = build_config(PipelineConfig, [{"data": {"task": easy, "num_traces": 40}, "eval": {"n": 40}}])
    assert [s.name for s in trace_specs(cfg.data, cfg.task)] == ["syllogism"]
    eval_q = [e.question for e in eval_examples(parse_tasks(cfg.task), cfg.eval, cfg.seed)]
    assert sum(" are not " in q for q in eval_q) >= 5  # the run's task has them
    out = tmp_path / "traces.jsonl"
    stats = make_traces(cfg.data, trace_specs(cfg.data, cfg.task), 0, out, exclude_questions=eval_q)
    rows = rows_of(out)
    assert stats["kept"] == len(rows) == 40
    assert not any(" are not " in r["question"] for r in rows) and not {r["question"] for r in rows} & set(eval_q)
    default = build_config(PipelineConfig, [{}])
    assert trace_specs(default.data, default.task) == parse_tasks(default.task)
    with pytest.raises(SmolthinkError, match="unknown task"):
        build_config(PipelineConfig, [{"data": {"task": "no_such_task"}}])


def test_verify_reasons():
    from smolthink.sandbox import Scorer

    ex = make_examples(parse_tasks("syllogism"), 1, 0, "train")[0]
    good = f"<think> two reasons </think> <answer>{ex.answer}</answer>"
    wrong = f"<think> two reasons </think> <answer>{'No' if ex.answer == 'Yes' else 'Yes'}</answer>"
    cases = [good, wrong, f"{good} trailing text", None, "<think> the hint says so </think> <answer>x</answer>"]
    with Scorer() as scorer:
        assert verify(cases, [ex] * 5, scorer, parse_tasks("syllogism"), check_hint_leak=True) == [
            None, "wrong", "format", "no_trace", "leaks_hint"]


def test_local_teacher_stats_add_up(tmp_path, tiny_lm, tiny_tokenizer):
    specs = parse_tasks(BOTH)
    out = tmp_path / "teacher.jsonl"
    cfg = DataConfig(source="teacher", num_traces=2, samples_per_question=2, max_new_tokens=6, top_up_rounds=0)
    stats = make_traces(cfg, specs, 0, out, model=tiny_lm, tokenizer=tiny_tokenizer)
    assert stats["questions"] == 2 and stats["kept"] + stats["rejected"] == 2
    assert sum(stats["rejected_by_reason"].values()) == stats["rejected"]
    assert stats["samples"] == 4 and 0 <= stats["samples_verified"] <= 4
    assert stats["teacher_completion_tokens"] <= 4 * 6 and stats["teacher_prompt_tokens"] > 0
    assert len(rows_of(out)) == stats["kept"]
    ex = make_examples(specs, 2, 0, "train")
    assert {reference_answer(e) for e in ex} and all(reference_answer(e) for e in ex)  # propositional_logic hints too


def test_api_teacher_against_the_local_server(tmp_path, tiny_lm, tiny_tokenizer, monkeypatch):
    from fault_server import Faults

    from smolthink.serve import make_server

    server = make_server(tiny_lm, tiny_tokenizer, port=0)
    faults = Faults(server)  # counts the requests that reach the server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        kw = {"base_url": server.url, "model": "smolthink-local", "api_key": "test", "concurrency": 2,
              "cache_dir": str(tmp_path / "cache")}
        specs = parse_tasks("syllogism")
        cfg = DataConfig(source="api", num_traces=2, samples_per_question=2, max_new_tokens=6, top_up_rounds=1)
        a = make_traces(cfg, specs, 0, tmp_path / "a.jsonl", teacher_kwargs=kw)
        assert a["kept"] + a["rejected"] == a["questions"] and a["samples"] == 2 * a["questions"]
        assert 2 <= a["questions"] <= 4 and a["rounds"] == (1 if a["kept"] == 2 else 2)
        assert a["teacher_completion_tokens"] > 0
        calls = faults.calls
        assert calls >= 2
        b = make_traces(cfg, specs, 0, tmp_path / "b.jsonl", teacher_kwargs=kw)
        assert faults.calls == calls  # every request answered from the cache
        assert b["teacher_cache_hits"] == b["questions"] == a["questions"] and b["teacher_http_requests"] == 0
        assert (b["kept"], b["rejected"]) == (a["kept"], a["rejected"])
        assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    finally:
        server.shutdown()
        server.server_close()
    # no settings at all: one clear error before any work
    for var in ("OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SmolthinkError, match="OPENAI_BASE_URL"):
        make_traces(DataConfig(source="api", num_traces=2), specs, 0, tmp_path / "c.jsonl")


class EchoTeacher:
    """A rollout engine standing in for a perfect teacher: it reads the answer from the hint in its prompt and
    writes a short rationale around it (so the API path keeps every trace and the saved rows can be checked)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, model, prompts, n, sampling, seed=None):
        from smolthink.types import Rollout

        out = []
        for p in prompts:
            text = self.tok.decode(p)
            answer = text.split("The correct answer is: ", 1)[1].split(". Explain step by step", 1)[0]
            ids = self.tok(f"<think> compare the premises </think> <answer>{answer}</answer>",
                           add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append([Rollout(list(p), ids, "stop") for _ in range(n)])
        return out


def test_hint_never_reaches_the_saved_rows(tmp_path, tiny_lm, tiny_tokenizer):
    """Through the real server and APITeacher: the teacher sees the hint, the saved row holds the plain question."""
    from smolthink.serve import make_server

    server = make_server(tiny_lm, tiny_tokenizer, port=0, engine=EchoTeacher(tiny_tokenizer))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kw = {"base_url": server.url, "model": "echo", "api_key": "test", "cache_dir": str(tmp_path / "cache")}
        specs = parse_tasks(BOTH)
        out = tmp_path / "t.jsonl"
        stats = make_traces(DataConfig(source="api", num_traces=4, samples_per_question=1), specs, 0, out,
                            teacher_kwargs=kw)
    finally:
        server.shutdown()
        server.server_close()
    assert stats["kept"] == 4 and stats["rejection_rate"] == 0.0, stats
    for r in rows_of(out):
        assert r["source"] == "api" and r["messages"][1]["content"] == r["question"]
        assert "correct answer is" not in json.dumps(r)
