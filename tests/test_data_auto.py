"""`data.source: auto`: the scripted solver where one exists, else the local teacher within its budget, then
format-only top-up; every kept trace verified and hint-free; yield counted per task and by source."""
import json

import pytest

from smolthink.chat import format_ok
from smolthink.config import DataConfig
from smolthink.data import make_traces, verify
from smolthink.data_auto import format_only_trace, question_caps, restate, task_sources, yield_lines
from smolthink.errors import SmolthinkError
from smolthink.sandbox import Scorer
from smolthink.tasks import make_examples, parse_tasks
from smolthink.types import Example

pytestmark = pytest.mark.usefixtures("one_thread")

MIX = "syllogism,letter_counting"


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_auto_picks_the_scripted_solver_where_one_exists():
    specs = parse_tasks("syllogism,propositional_logic,letter_counting:2,family_relationships")
    assert task_sources("auto", specs) == {"syllogism": "scripted", "propositional_logic": "scripted",
                                           "letter_counting": "teacher", "family_relationships": "teacher"}
    assert set(task_sources("teacher", specs).values()) == {"teacher"}
    # the teacher budget goes to the teacher tasks alone, by weight
    assert question_caps(DataConfig(teacher_questions=30), specs, task_sources("auto", specs)) == {
        "letter_counting": 20, "family_relationships": 10}
    assert question_caps(DataConfig(source="teacher"), specs, task_sources("teacher", specs)) == {}
    assert DataConfig().source == "auto"


class HintedTeacher:
    """A rollout engine standing in for a teacher: per question, sample 0 quotes the hint, sample 1 answers
    wrongly, sample 2 (only on every other question) gives a clean verified rationale."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.calls = 0

    def generate(self, model, prompts, n, sampling, seed=None):
        from smolthink.types import Rollout

        out = []
        for p in prompts:
            self.calls += 1
            answer = self.tok.decode(p).split("The correct answer is: ", 1)[1].split(". Explain step by step", 1)[0]
            texts = [f"<think> the hint says it is {answer} </think> <answer>{answer}</answer>",
                     "<think> count each letter once </think> <answer>-1</answer>",
                     f"<think> count each letter of the text once </think> <answer>{answer}</answer>"]
            texts = texts[:3 if self.calls % 2 else 2]
            texts = [texts[i % len(texts)] for i in range(n)]
            ids = [self.tok(t, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] for t in texts]
            out.append([Rollout(list(p), x, "stop") for x in ids])
        return out


def test_auto_mixture_keeps_only_verified_hint_free_traces(tmp_path, tiny_lm, tiny_tokenizer, monkeypatch):
    import smolthink.rollout

    teacher = HintedTeacher(tiny_tokenizer)
    monkeypatch.setattr(smolthink.rollout, "make_engine", lambda *a, **k: teacher)
    specs = parse_tasks(MIX)
    out = tmp_path / "t.jsonl"
    cfg = DataConfig(num_traces=8, samples_per_question=3, teacher_questions=4, top_up_rounds=1)
    stats = make_traces(cfg, specs, 0, out, model=tiny_lm, tokenizer=tiny_tokenizer)
    rows = rows_of(out)
    by_task = stats["by_task"]
    assert by_task["syllogism"]["source"] == "scripted" and by_task["letter_counting"]["source"] == "teacher"
    assert {r["source"] for r in rows if r["task"] == "syllogism"} == {"scripted"}
    letters = by_task["letter_counting"]
    # the teacher tried its budget of 4 questions and no more (top-up rounds stay within it); half verified
    assert letters["questions_by_source"]["teacher"] == 4 == teacher.calls
    assert letters["kept_by_source"]["teacher"] == 2
    assert letters["rejected_by_reason"]["wrong"] == 2  # a wrong answer outranks the leak it also sampled
    # the shortfall is format-only, labelled as such in every row and counted in the stats
    assert letters["kept_by_source"]["format_only"] == 2 and letters["kept"] == letters["target"] == 4
    assert stats["kept_by_source"] == {"scripted": 4, "teacher": 2, "format_only": 2}
    assert len(rows) == stats["kept"] == 8
    teacher_rows = [r for r in rows if r["source"] == "teacher"]
    assert len(teacher_rows) == 2
    for r in teacher_rows:  # the clean rationale, never the one quoting the hint
        assert "hint" not in r["messages"][2]["content"] and "correct answer is" not in json.dumps(r)
        assert r["messages"][1]["content"] == r["question"]
    # every kept row verifies under the reward's strict scoring (its gold matches exactly), hint check included
    examples = [Example(id=r["id"], task=r["task"], question=r["question"], answer=r["answer"], entry={})
                for r in rows]
    with Scorer() as scorer:
        assert verify([r["messages"][2]["content"] for r in rows], examples, scorer, specs,
                      check_hint_leak=True) == [None] * len(rows)
    assert any("letter_counting (teacher): kept 4 of 4 (2 teacher + 2 format-only)" in line
               for line in yield_lines(stats))


def test_format_only_top_up_is_labelled_counted_and_verified(tmp_path, tiny_lm, tiny_tokenizer):
    """The tiny random teacher verifies nothing: the whole target is format-only, each trace the question restated
    and the verified gold answer."""
    specs = parse_tasks("letter_counting")
    out = tmp_path / "t.jsonl"
    cfg = DataConfig(num_traces=6, samples_per_question=2, max_new_tokens=4, teacher_questions=3, top_up_rounds=0)
    stats = make_traces(cfg, specs, 0, out, model=tiny_lm, tokenizer=tiny_tokenizer)
    rows = rows_of(out)
    row = stats["by_task"]["letter_counting"]
    assert row["questions_by_source"] == {"teacher": 3, "format_only": 6}
    assert row["kept_by_source"] == {"format_only": 6} and stats["kept"] == 6 == len(rows)
    assert row["rejected"] == 3 and sum(row["rejected_by_reason"].values()) == 3
    assert stats["samples"] == 3 * 2 + 6
    for r in rows:
        trace = r["messages"][2]["content"]
        assert r["source"] == "format_only" and format_ok(trace)
        assert trace.startswith("<think> The question asks: How many times does the letter")
        assert trace.endswith(f"<answer> {r['answer']} </answer>")
    assert len({r["question"] for r in rows}) == 6


def test_restate_keeps_the_ask_short_and_tag_free():
    ex = make_examples(parse_tasks("syllogism"), 1, 0, "train")[0]
    assert restate(ex.question) == ex.question.strip().splitlines()[-1].strip()
    long = "Intro line.\n" + " ".join(["word"] * 60) + " <answer>"
    assert restate(long) == " ".join(["word"] * 40) + " ..."
    assert restate("What is <think>this</think>?") == "What is this?"
    assert format_ok(format_only_trace(ex))


def test_no_verified_trace_with_top_up_off_stops_with_what_to_do(tmp_path, tiny_lm, tiny_tokenizer):
    out = tmp_path / "t.jsonl"
    cfg = DataConfig(num_traces=4, samples_per_question=1, max_new_tokens=4, teacher_questions=2, top_up_rounds=0,
                     format_only_top_up=False)
    with pytest.raises(SmolthinkError, match="no teacher trace verified for task 'letter_counting' in 2 questions "
                                             "x 1 samples: set data.format_only_top_up=true"):
        make_traces(cfg, parse_tasks(MIX), 0, out, model=tiny_lm, tokenizer=tiny_tokenizer)
    assert not out.exists()  # nothing written: the stage is not done
