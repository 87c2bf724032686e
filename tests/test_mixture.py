"""Mixtures end to end on the tiny model: per-task eval sets disjoint from the train questions, per-task eval
summaries and GRPO metrics, per-task and transfer report sections; and bad input stops with one line and no DONE."""
import json

import pytest

from smolthink.cli import main
from smolthink.evaluate import summarize
from smolthink.task_metrics import per_task_line, per_task_metrics
from smolthink.tasks import parse_tasks, train_eval_split
from smolthink.types import Example, RewardParts

MIX = "syllogism:1,letter_counting:1"
SETS = ["eval.n=8", "eval.max_new_tokens=8", "data.num_traces=8", "data.teacher_questions=2",
        "data.samples_per_question=2", "data.max_new_tokens=8", "threads=2", "transfer.tasks=[aiw,syllogism]",
        "transfer.n=2", "sft.max_steps=2", "sft.minibatch_size=4", "sft.warmup_steps=0", "grpo.max_steps=2",
        "grpo.max_completion_length=8", "grpo.prompts_per_rollout=4", "grpo.num_generations=2",
        "grpo.buffer_size=8", "grpo.minibatch_size=8", "grpo.gradient_accumulation_steps=1", "grpo.train_size=32",
        "grpo.engine=hf", "rl=true", "sft_control=false", "passk.enabled=false"]


def pipeline_args(run, model, task=MIX, sets=SETS):
    args = ["pipeline", "--model", str(model), "--out", str(run), "--set", f"task={task}"]
    for s in sets:
        args += ["--set", s]
    return args


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_mixture_eval_sets_are_per_task_balanced_and_disjoint_from_train():
    specs = parse_tasks("syllogism:1,circuit_logic:1,letter_counting:2")
    train, evals = train_eval_split(specs, 200, 40, seed=3)
    assert not {e.question for e in train} & {e.question for e in evals}
    per = {t: [e.answer for e in evals if e.task == t] for t in ("syllogism", "circuit_logic", "letter_counting")}
    assert [len(v) for v in per.values()] == [10, 10, 20]
    assert per["syllogism"].count("Yes") == per["syllogism"].count("No") == 5  # balanced within each task
    assert per["circuit_logic"].count("0") == per["circuit_logic"].count("1") == 5


def test_eval_summary_breaks_a_mixture_down_per_task():
    exs = [Example(str(i), t, f"q{i}", g, {}) for i, (t, g) in enumerate(
        [("syllogism", "Yes"), ("syllogism", "No"), ("aiw", "3"), ("aiw", "4")])]
    parts = [[RewardParts(correct=c, format=f, total=c)] for c, f in ((1, 1), (0, 1), (1, 1), (1, 0))]
    s = summarize(exs, parts, [["<answer>Yes</answer>"]] * 4, [[5]] * 4, [[False]] * 4)
    assert s["accuracy"] == 0.75 and set(s["per_task"]) == {"aiw", "syllogism"}
    assert s["per_task"]["syllogism"]["accuracy"] == 0.5 and s["per_task"]["syllogism"]["n"] == 2
    assert s["per_task"]["syllogism"]["balanced_accuracy"] == 0.5
    assert s["per_task"]["aiw"]["accuracy"] == 1.0 and s["per_task"]["aiw"]["format_rate"] == 0.5
    assert s["per_task"]["aiw"]["accuracy_ci95"][0] < 1.0
    assert "per_task" not in summarize(exs[:2], parts[:2], [["x"]] * 2, [[5]] * 2, [[False]] * 2)


def test_per_task_rollout_metrics():
    from smolthink.groups import GroupResult

    def p(total, correct, fmt):
        return RewardParts(correct=correct, format=fmt, total=total)

    def group(task, zero_std):
        return GroupResult(Example("0", task, "q", "1", {}), "train", None, n=2, solved=0, tokens=4,
                           zero_std=zero_std)

    # three groups of G=2: a (all equal: no signal), b, a
    groups = [group("a", True), group("b", False), group("a", False)]
    parts = [p(1, 1, 1), p(1, 1, 1), p(0, 0, 1), p(1, 1, 0), p(0.5, 0, 1), p(0, 0, 0)]
    m = per_task_metrics(groups, parts, ["a", "b"])
    assert m["reward/a/mean"] == pytest.approx(2.5 / 4) and m["reward/a/correct"] == 0.5
    assert m["reward/a/format"] == 0.75 and m["reward/a/frac_zero_std_groups"] == 0.5
    assert m["reward/b/correct"] == 0.5 and m["reward/b/frac_zero_std_groups"] == 0.0
    assert per_task_metrics(groups[:1], parts[:2], ["a"]) == {}  # one task: the totals say it all
    assert per_task_line({"reward/correct": 0.5, **m}) == " | acc by task: a 0.50, b 0.50"


def test_two_task_mixture_pipeline(tmp_path, tiny_dir):
    run = tmp_path / "run"
    assert main(pipeline_args(run, tiny_dir)) == 0
    for stage in ("base_eval", "data", "sft", "grpo", "final_eval", "transfer", "report"):
        assert (run / stage / "DONE").is_file(), stage
    tasks = {"syllogism", "letter_counting"}
    # eval summaries per task, 4 questions each
    for path in (run / "base_eval" / "eval.json", run / "final_eval" / "eval.json"):
        per = json.loads(path.read_text())["per_task"]
        assert set(per) == tasks and all(v["n"] == 4 for v in per.values())
    # the data stage: scripted syllogism, letter_counting from the teacher then format-only; counted per task
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["by_task"]["syllogism"]["kept_by_source"] == {"scripted": 4}
    letters = stats["by_task"]["letter_counting"]
    assert letters["questions_by_source"]["teacher"] == 2 and letters["kept"] == 4
    traces = read_jsonl(run / "data" / "traces.jsonl")
    assert sum(r["source"] == "format_only" for r in traces) == letters["kept_by_source"]["format_only"] >= 2
    # no eval question is trained on: warm-up traces and GRPO rollouts come from other questions
    eval_q = {r["question"] for r in read_jsonl(run / "base_eval" / "completions.jsonl")}
    assert len(eval_q) == 8
    assert not eval_q & {r["question"] for r in traces}
    rollouts = [r for p in sorted((run / "grpo" / "samples").glob("*.jsonl")) for r in read_jsonl(p)]
    assert rollouts and not eval_q & {r["prompt"] for r in rollouts}
    # GRPO metrics per task
    metrics = read_jsonl(run / "grpo" / "metrics.jsonl")
    seen = set()
    for row in metrics:  # a fill of 4 questions may hold one task only: it breaks down the tasks it holds
        mine = {k.split("/")[1] for k in row if k.count("/") == 2 and k.startswith("reward/")}
        assert mine and mine <= tasks
        for t in mine:
            assert 0 <= row[f"reward/{t}/correct"] <= 1 and 0 <= row[f"reward/{t}/frac_zero_std_groups"] <= 1
        seen |= mine
    assert seen == tasks
    # transfer: aiw only (syllogism is trained on), base and final
    for model in ("base", "final"):
        s = json.loads((run / "transfer" / f"{model}.json").read_text())
        assert s["task"] == "aiw" and s["n"] == 2
    report = (run / "report.md").read_text()
    assert "## Per task" in report and "### GRPO rollouts per task" in report
    assert "| letter_counting | base | 4 |" in report and "| syllogism | final (grpo) | 4 |" in report
    assert "## Transfer to tasks outside the training mixture" in report and "| aiw | 2 |" in report
    assert "letter_counting (teacher): kept 4 of 4" in report


@pytest.mark.parametrize("task, extra, message", [
    ("syllogism:0,aiw:1", [], "bad mixture weight for task 'syllogism': '0' (expected a finite number > 0"),
    ("syllogism:-1", [], "bad mixture weight for task 'syllogism': '-1'"),
    ("sylogism", [], "unknown task 'sylogism' (did you mean 'syllogism'?)"),
    (MIX, ["transfer.tasks=[aiw,gdc]"], "unknown task 'gdc' (did you mean 'gcd'?)"),
    ("[{name: chain_sum, config: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}]",
     ["grpo.train_size=500"], "task 'chain_sum' cannot produce 500 distinct train questions (the GRPO stage needs"),
])
def test_bad_task_stops_before_any_stage(tmp_path, tiny_dir, capsys, task, extra, message):
    run = tmp_path / "run"
    assert main(pipeline_args(run, tiny_dir, task, SETS + extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(run.glob("*/DONE"))


def test_stage_stops_on_a_generator_without_settings_and_on_no_verified_trace(tmp_path, tiny_dir, capsys):
    run = tmp_path / "a"
    assert main(pipeline_args(run, tiny_dir, "composite")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "bad config for task 'composite'" in err[-1] and "set its generator settings as task: [{name: " \
        "composite, config: {...}}]" in err[-1] and "(fields: datasets)" in err[-1]
    assert not list(run.glob("*/DONE"))
    run = tmp_path / "b"
    assert main(pipeline_args(run, tiny_dir, "letter_counting", SETS + ["data.format_only_top_up=false"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no teacher trace verified for task 'letter_counting'" in err[-1], err
    assert (run / "base_eval" / "DONE").is_file() and not (run / "data" / "DONE").exists()


def test_each_task_of_a_mixture_keeps_its_own_scorer():
    """Answers the exact match cannot settle go to the sandbox under their own task's name and generator config."""
    from smolthink.config import RewardConfig
    from smolthink.rewards import score_completions
    from smolthink.sandbox import Scorer
    from smolthink.tasks import make_examples, reference_answer

    letters_cfg = {"min_words": 3, "max_words": 4}
    specs = parse_tasks([{"name": "propositional_logic"}, {"name": "letter_counting", "config": letters_cfg}])
    exs = make_examples(specs, 16, 0, "eval")
    letters = next(e for e in exs if e.task == "letter_counting")
    seen = []
    with Scorer() as scorer:
        # propositional_logic has no gold: its checker decides (and scores some metadata answers, trivial
        # conclusions, 0.05: take one it accepts)
        prop = next(e for e in exs if e.task == "propositional_logic"
                    and scorer.score_many([(e.task, {}, reference_answer(e), e.entry)])[0][0] == 1.0)
        conclusion = reference_answer(prop)
        texts = [f"<think> from the premises </think> <answer>{a}</answer>" for a in (conclusion, conclusion, "-1")]

        class Recording:
            def score_many(self, items):
                seen.extend((task, config) for task, config, _, _ in items)
                return scorer.score_many(items)

        parts = score_completions(texts, [prop, letters, letters], [5] * 3, Recording(), specs, RewardConfig(), 64)
    assert [p.correct for p in parts] == [1.0, 0.0, 0.0] and all(p.error is None for p in parts)
    assert seen == [("propositional_logic", {}), ("letter_counting", letters_cfg), ("letter_counting", letters_cfg)]
