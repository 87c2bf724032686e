"""Bad input to every command ends in one line that names the field or the file, and a non-zero exit: never a
traceback, never an "internal error" (each row is a failure the code expects). Rows run `cli.main` in process and
fail before any model loads, except the few that need one (the tiny model, or a damaged file in its place)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from smolthink.cli import main

MSG = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]

# (id, argv with {tiny}/{bad}/{dead} placeholders, words the message must contain)
ROWS = [
    # eval: CLI numbers, config values, tasks and mixtures
    ("eval-temperature-nan", "eval --temperature nan", ["eval.temperature", "finite"]),
    ("eval-temperature-negative", "eval --temperature -1", ["eval.temperature", ">= 0"]),
    ("eval-top-p-2", "eval --top-p 2", ["eval.top_p", "<= 1"]),
    ("eval-max-new-tokens-0", "eval --max-new-tokens 0", ["eval.max_new_tokens"]),
    ("eval-n-negative", "eval --n -5", ["eval.n", ">= 0"]),
    ("eval-n-0", "eval --n 0", ["eval.n", ">= 1"]),
    ("eval-samples-0", "eval --samples 0", ["eval.samples"]),
    ("eval-batch-size-negative", "eval --batch-size -1", ["eval.batch_size"]),
    ("eval-scorer-timeout-nan", "eval --scorer-timeout nan", ["reward.scorer_timeout", "finite"]),
    ("eval-threads-negative", "eval --threads -1", ["threads"]),
    ("eval-samples-greedy", "eval --samples 4", ["eval.samples", "eval.temperature"]),
    ("eval-n-not-a-number", "eval --n abc", ["--n"]),
    ("eval-engine-unknown", "eval --engine tpu", ["--engine"]),
    ("mixture-weight-abc", "eval --task syllogism:abc", ["syllogism", "'abc'"]),
    ("mixture-weight-nan", "eval --task syllogism:nan", ["syllogism", "'nan'"]),
    ("mixture-weight-inf", "eval --task syllogism:inf", ["syllogism", "'inf'"]),
    ("mixture-weight-0", "eval --task syllogism:0", ["syllogism", "'0'"]),
    ("mixture-weight-negative", "eval --task propositional_logic:1,syllogism:-2", ["syllogism", "'-2'"]),
    ("task-unknown", "eval --task nosuchtask", ["nosuchtask"]),
    ("task-needs-settings", "eval --task composite", ["composite", "at least one dataset"]),
    ("task-bad-setting", "eval --set task=[{name: syllogism, config: {bogus: 1}}]", ["syllogism", "bogus"]),
    ("task-bad-setting-type", "eval --set task=[{name: basic_arithmetic, config: {min_terms: x}}]",
     ["basic_arithmetic"]),
    ("task-empty-list", "eval --set task=[]", ["no task"]),
    ("config-key-unknown", "eval --set nosuchkey=1", ["nosuchkey"]),
    ("config-key-close-match", "eval --set eval.temprature=1", ["eval.temprature", "eval.temperature"]),
    ("config-key-not-a-section", "eval --set eval.n.x=1", ["eval.n.x"]),
    ("config-set-no-equals", "eval --set noequals", ["noequals"]),
    ("config-section-scalar", "eval --set eval=5", ["eval"]),
    ("config-int-too-large", "eval --set eval.n=99999999999999", ["eval.n"]),
    ("config-yaml-binary", "eval --config {bad}/binary.yaml", ["binary.yaml"]),
    ("config-yaml-directory", "eval --config {bad}/dir.yaml", ["dir.yaml"]),
    ("config-yaml-missing", "eval --config {bad}/missing.yaml", ["missing.yaml"]),
    ("config-yaml-list", "eval --config {bad}/list.yaml", ["list.yaml"]),
    ("config-yaml-syntax", "eval --config {bad}/syntax.yaml", ["syntax.yaml"]),
    ("model-gguf-empty", "eval --model {bad}/empty.gguf", ["empty.gguf"]),
    ("model-gguf-garbage", "eval --model {bad}/garbage.gguf", ["garbage.gguf"]),
    ("model-gguf-corrupt", "eval --model {bad}/corrupt.gguf", ["corrupt.gguf"]),
    ("model-gguf-header-only", "eval --model {bad}/header.gguf", ["header.gguf"]),
    ("model-weights-truncated", "eval --model {bad}/truncated --n 1", ["model.safetensors", "truncated"]),
    ("model-config-not-json", "eval --model {bad}/badconfig --n 1", ["config.json"]),
    ("model-dir-not-a-model", "eval --model {bad}/emptydir", ["emptydir"]),
    ("model-path-missing", "eval --model {bad}/nosuchmodel/", ["nosuchmodel"]),
    ("eval-out-is-a-file", "eval --model {tiny} --out {bad}/afile", ["afile", "is a file"]),
    ("eval-out-under-a-file", "eval --model {tiny} --out {bad}/afile/sub", ["afile/sub"]),
    ("eval-out-unwritable", "eval --model {tiny} --out /proc/smolthink-out", ["/proc/smolthink-out"]),
    # train (GRPO): config values that used to ruin a run or fail late
    ("train-correct-weight-nan", "train --set correct_weight=.nan", ["correct_weight", "finite"]),
    ("train-correct-weight-negative", "train --set reward.correct_weight=-1", ["correct_weight"]),
    ("train-learning-rate-inf", "train --set learning_rate=.inf", ["learning_rate", "finite"]),
    ("train-max-grad-norm-nan", "train --set max_grad_norm=.nan", ["max_grad_norm", "finite"]),
    ("train-top-k-negative", "train --set top_k=-5", ["top_k"]),
    ("train-lora-dropout-2", "train --set lora_dropout=2", ["lora_dropout"]),
    ("train-adam-beta1", "train --set adam_beta1=1.5", ["adam_beta1"]),
    ("train-weight-decay-negative", "train --set weight_decay=-1", ["weight_decay"]),
    ("train-log-every-0", "train --set log_every=0", ["log_every"]),
    ("train-list-field-given-str", "train --set lora_target_modules=q_proj", ["lora_target_modules", "list"]),
    ("train-list-field-given-int", "train --set reward.functions=5", ["reward.functions", "list"]),
    ("train-str-field-given-int", "train --set model=5", ["model", "string"]),
    ("train-task-given-int", "train --set task=5", ["task"]),
    ("train-bool-field", "train --set use_lora=maybe", ["use_lora"]),
    ("train-int-field-given-float", "train --set max_steps=1.5", ["max_steps", "integer"]),
    ("train-choice", "train --set loss_type=ppo", ["loss_type", "dapo"]),
    ("train-num-generations-1", "train --set num_generations=1", ["num_generations"]),
    ("train-buffer-below-minibatch", "train --set buffer_size=2 --set minibatch_size=8", ["buffer_size"]),
    ("train-out-is-a-file", "train --out {bad}/afile", ["afile", "is a file"]),
    ("train-out-under-a-file", "train --out {bad}/afile/run", ["afile/run"]),
    ("train-resume-missing", "train --resume {bad}/nosuchrun", ["nosuchrun"]),
    # sft: traces files and a LoRA target the model does not have
    ("sft-lora-target-unknown", "sft --model {tiny} --out {run} --set lora_target_modules=[q_proj,qproj] "
     "--set data.path={bad}/good.jsonl --set eval.n=0", ["qproj", "lora_target_modules", "v_proj"]),
    ("sft-traces-content-missing", "sft --model {tiny} --out {run} --set data.path={bad}/no_content.jsonl",
     ["no_content.jsonl:1", "'content'"]),
    ("sft-traces-content-int", "sft --model {tiny} --out {run} --set data.path={bad}/int_content.jsonl",
     ["int_content.jsonl:1", "'content'"]),
    ("sft-traces-role-missing", "sft --model {tiny} --out {run} --set data.path={bad}/no_role.jsonl",
     ["no_role.jsonl:1", "'role'"]),
    ("sft-traces-question-list", "sft --model {tiny} --out {run} --set data.path={bad}/question_list.jsonl",
     ["question_list.jsonl:1", "'question'"]),
    ("sft-traces-binary", "sft --model {tiny} --out {run} --set data.path={bad}/binary.jsonl", ["binary.jsonl"]),
    ("sft-traces-not-json", "sft --model {tiny} --out {run} --set data.path={bad}/not_json.jsonl",
     ["not_json.jsonl:1"]),
    ("sft-traces-empty", "sft --model {tiny} --out {run} --set data.path={bad}/empty.jsonl", ["empty.jsonl"]),
    ("sft-traces-row-a-list", "sft --model {tiny} --out {run} --set data.path={bad}/row_list.jsonl",
     ["row_list.jsonl:1", "messages"]),
    ("sft-traces-turn-order", "sft --model {tiny} --out {run} --set data.path={bad}/turn_order.jsonl",
     ["turn_order.jsonl:1", "assistant"]),
    ("sft-traces-missing", "sft --out {run} --set data.path={bad}/nosuch.jsonl", ["nosuch.jsonl"]),
    ("sft-max-length-1", "sft --set max_length=1", ["max_length"]),
    ("sft-data-source", "sft --set data.source=web", ["data.source", "scripted"]),
    ("sft-out-is-a-file", "sft --out {bad}/afile", ["afile"]),
    # data
    ("data-n-0", "data --n 0", ["data.num_traces"]),
    ("data-concurrency-0", "data --source api --concurrency 0", ["data.api_concurrency"]),
    ("data-source-unknown", "data --source web", ["--source"]),
    ("data-api-no-url", "data --source api --n 2 --out {run}.jsonl", ["OPENAI_BASE_URL"]),
    ("data-api-unreachable", "data --source api --base-url http://127.0.0.1:{dead} --api-model m --n 2 --eval-n 2 "
     "--out {run}.jsonl", [":{dead}", "answered none"]),
    ("data-task-needs-settings", "data --task composite --n 2", ["composite"]),
    ("data-teacher-gguf-empty", "data --source teacher --model {bad}/empty.gguf --n 2 --eval-n 2 --out {run}.jsonl",
     ["empty.gguf"]),
    ("data-out-is-a-directory", "data --out {bad}/emptydir --n 2", ["emptydir", "is a directory"]),
    ("data-out-under-a-file", "data --out {bad}/afile/traces.jsonl --n 2", ["afile"]),
    # pipeline
    ("pipeline-sft-not-a-mapping", "pipeline --out {run} --set sft=5", ["sft", "mapping"]),
    ("pipeline-grpo-not-a-mapping", "pipeline --out {run} --set grpo=[1]", ["grpo", "mapping"]),
    ("pipeline-stage-value", "pipeline --out {run} --set grpo.num_generations=1", ["num_generations"]),
    ("pipeline-stage-key-unknown", "pipeline --out {run} --set sft.bogus=1", ["bogus"]),
    ("pipeline-eval-n-0", "pipeline --out {run} --set eval.n=0", ["eval.n"]),
    ("pipeline-yaml-binary", "pipeline --out {run} --config {bad}/binary.yaml", ["binary.yaml"]),
    ("pipeline-out-is-a-file", "pipeline --out {bad}/afile", ["afile"]),
    # report
    ("report-missing-dir", "report {bad}/nosuchrun", ["nosuchrun"]),
    ("report-not-a-run", "report {bad}/emptydir", ["emptydir", "not a run directory"]),
    ("report-a-file", "report {bad}/afile", ["afile"]),
    # serve: checked before any model loads or any port is bound
    ("serve-port-too-large", "serve --port 99999", ["--port", "65535"]),
    ("serve-port-negative", "serve --port -1", ["--port"]),
    ("serve-port-not-a-number", "serve --port http", ["--port"]),
    ("serve-model-gguf-garbage", "serve --model {bad}/garbage.gguf", ["garbage.gguf"]),
    # tasks, bench, the top level
    ("tasks-extra-argument", "tasks syllogism", ["syllogism"]),
    ("bench-parts-unknown", "bench --parts flops,gpu", ["--parts"]),
    ("bench-engines-unknown", "bench --engines tpu", ["--engines"]),
    ("bench-reps-0", "bench --reps 0", ["--reps"]),
    ("bench-temperature-nan", "bench --temperature nan", ["--temperature"]),
    ("bench-top-p-2", "bench --top-p 2", ["--top-p"]),
    ("bench-group-1", "bench --group 1", ["--group"]),
    ("bench-out-is-a-directory", "bench --out {bad}/emptydir", ["emptydir"]),
    ("command-unknown", "frobnicate", ["frobnicate"]),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_dir):
    """A directory of damaged and misshapen inputs."""
    d = tmp_path_factory.mktemp("bad")
    junk = bytes(range(256)) * 8  # not UTF-8, not any format
    (d / "binary.yaml").write_bytes(junk)
    (d / "dir.yaml").mkdir()
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "syntax.yaml").write_text("a: [\n")
    (d / "afile").write_text("x")
    (d / "emptydir").mkdir()
    (d / "empty.gguf").write_bytes(b"")
    (d / "garbage.gguf").write_bytes(junk)
    (d / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + junk)
    (d / "header.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + (3).to_bytes(8, "little") + (1).to_bytes(8, "little"))
    shutil.copytree(tiny_dir, d / "truncated")
    weights = d / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(tiny_dir, d / "badconfig")
    (d / "badconfig" / "config.json").write_text("{not json")
    rows = {
        "good": {"messages": MSG + [{"role": "assistant", "content": "<think> x </think> <answer>Yes</answer>"}]},
        "no_content": {"messages": MSG + [{"role": "assistant"}]},
        "int_content": {"messages": MSG + [{"role": "assistant", "content": 5}]},
        "no_role": {"messages": [MSG[0], {"content": "q"}, {"role": "assistant", "content": "a"}]},
        "question_list": {"question": ["q"], "messages": MSG + [{"role": "assistant", "content": "a"}]},
        "row_list": [1, 2],
        "turn_order": {"messages": [MSG[1], {"role": "assistant", "content": "a"}, MSG[1]]},
    }
    for name, row in rows.items():
        (d / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    (d / "binary.jsonl").write_bytes(junk)
    (d / "not_json.jsonl").write_text("{messages: [}\n")
    (d / "empty.jsonl").write_text("\n")
    return d


@pytest.fixture(scope="module")
def dead_port():
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(argv: list[str]) -> int:
    """main()'s exit code, argparse's usage errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def fill(text: str, values: dict) -> str:
    """`text` with each {name} of `values` replaced (str.format would trip over the YAML braces)."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def words(text: str) -> list[str]:
    """A row's argv: split on spaces, but a flow-YAML value ({...} / [...]) stays one word."""
    out, depth = [], 0
    for part in text.split(" "):
        if depth:
            out[-1] += " " + part
        else:
            out.append(part)
        depth += part.count("[") + part.count("{") - part.count("]") - part.count("}")
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_naming_it(row, bad, tiny_dir, dead_port, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SMOLTHINK_CACHE", str(tmp_path / "cache"))  # a GGUF row's conversion, an error log
    monkeypatch.setenv("OPENAI_BASE_URL", "")
    monkeypatch.setenv("OPENAI_MODEL", "")
    _, text, expected = row
    values = {"tiny": tiny_dir, "bad": bad, "dead": dead_port, "run": tmp_path / "run"}
    code = run_cli(words(fill(text, values)))
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err and "internal error" not in err, err
    for word in expected:
        assert fill(word, values) in err, (word, err)
    assert not (tmp_path / "cache" / "logs").exists()


def test_ids_are_unique_and_the_table_is_large():
    assert len({r[0] for r in ROWS}) == len(ROWS) >= 60


def test_an_unexpected_error_is_one_line_and_a_log_file(tmp_path, capsys, monkeypatch):
    import smolthink.cli

    def broken(args):
        raise RuntimeError("the tokenizer exploded\nsecond line")

    monkeypatch.setenv("SMOLTHINK_CACHE", str(tmp_path))
    monkeypatch.setattr(smolthink.cli, "cmd_tasks", broken)
    assert run_cli(["tasks"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error: RuntimeError: the tokenizer exploded" in err
    (log,) = (tmp_path / "logs").iterdir()
    assert str(log) in err
    assert "Traceback" in log.read_text() and "second line" in log.read_text()
    # --debug prints the traceback instead
    assert run_cli(["--debug", "tasks"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "the tokenizer exploded" in err
    assert len(list((tmp_path / "logs").iterdir())) == 1


def test_machine_refusals_and_ctrl_c_are_one_line(capsys, monkeypatch):
    import smolthink.cli

    def full_disk(args):
        raise OSError(28, "No space left on device", "/runs/x/metrics.jsonl")

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(smolthink.cli, "cmd_tasks", full_disk)
    assert run_cli(["tasks"]) == 1
    assert capsys.readouterr().err.strip() == "smolthink: error: No space left on device: /runs/x/metrics.jsonl"
    monkeypatch.setattr(smolthink.cli, "cmd_tasks", ctrl_c)
    assert run_cli(["tasks"]) == 130
    assert capsys.readouterr().err.strip() == "smolthink: interrupted"


def test_a_real_process_exits_non_zero_without_a_traceback(tmp_path):
    """The same boundary seen from outside: the process's exit code and its whole stderr."""
    env = {**os.environ, "SMOLTHINK_CACHE": str(tmp_path)}
    for argv, word in ((["serve", "--port", "99999"], "--port"), (["eval", "--n", "-5"], "eval.n")):
        proc = subprocess.run([sys.executable, "-m", "smolthink.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and word in proc.stderr, proc.stderr
