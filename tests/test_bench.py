"""bench helpers: the flags on the main parser, summaries, the reward used on the TRL side, the table, the child
processes' wiring (no timings asserted, nothing benchmarked)."""
import json
import os
import subprocess
import sys

import pytest
from smolthink import bench
from smolthink.bench import grpo
from smolthink.bench.grpo import strict_syllogism_reward
from smolthink.bench.tables import format_table, summarize, training_flops
from smolthink.cli import build_parser, cmd_bench

# what the bench's own parser gave for `--parts flops,rollout --reps 2 --set a=1` before its flags moved onto the
# main CLI parser
OLD_NAMESPACE = {"model": None, "prompts": 8, "group": 6, "max_new_tokens": 300, "temperature": 0.7, "top_p": 0.95,
                 "reps": 2, "threads": 0, "seed": 0, "engines": "hf,fast", "parts": "flops,rollout",
                 "grpo": "trl,smolthink", "grpo_steps": 2, "minibatch": 8, "max_tokens_per_forward": None,
                 "sets": ["a=1"], "out": "benchmarks/results.json", "child": None, "child_out": None}
# the flags added since, in their order after the old ones
NEW_FLAGS = {"contention": False, "contention_threads": "2,1,0", "contention_policies": "default,passive"}


def test_summarize():
    assert summarize([3, 1, 2]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([])["n"] == 0


def test_strict_reward_matches_the_recipe_weights():
    good = "<think> all A are B </think> <answer>Yes</answer>"
    assert strict_syllogism_reward(good, "Yes") == 0.85 + 0.15
    assert abs(strict_syllogism_reward(good, "No") - 0.15) < 1e-9
    assert strict_syllogism_reward("Yes", "Yes") == 0.0  # no answer block, no format


def test_format_table_renders_every_part():
    s = {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    results = {
        "machine": {"cpu": "X", "cores": 2, "torch_threads": 2, "load_avg_start": [1.0, 1.0, 1.0],
                    "versions": {"torch": "2.13.0"}},
        "gemm": {"mkl_m48": s, "onednn_m48": s, "mkl_m2048": s, "onednn_m2048": s, "limit_gflops_48": 2.0,
                 "limit_gflops_2048": 2.0},
        "model": {"n_params": 1e6, "decode_limit_tok_s": 1000.0},
        "rollout": {"prompts": 8, "group": 6, "max_new_tokens": 300, "temperature": 0.7, "top_p": 0.95,
                    "runs": {"hf": [{}], "fast": [{"phases": {"prep_s": 1, "prefill_s": 1, "decode_s": 1,
                                                              "sample_s": 1, "prefix_len": 99},
                                                   "rows_per_step": 12.0}]},
                    "summary": {e: {"tok_s": s, "wall_s": s, "ms_per_step": s, "pct_flop_limit": s,
                                    "real_row_frac": s, "rss_peak_gb": s} for e in ("hf", "fast")},
                    "ratio_fast_over_hf": 5.0},
        "grpo": {"trl": {"version": "1.0", "step_s_summary": s, "rollout_s_summary": s, "train_s_summary": s,
                         "peak_rss_gb": 3.0},
                 "smolthink": {"available": False, "reason": "not written yet"}},
    }
    table = format_table(results)
    for needle in ("GEMM", "hf", "fast", "5.0x", "trl 1.0", "not available: not written yet"):
        assert needle in table
    fast = {"median": 0.5, "min": 0.4, "max": 0.6, "n": 3}
    results["grpo"]["smolthink"] = {"step_s_summary": fast, "rollout_s_summary": fast, "train_s_summary": fast,
                                    "train_tok_s_summary": {"median": 250.0, "min": 240.0, "max": 260.0, "n": 3},
                                    "peak_rss_gb": 1.0}
    results["training_flops"] = training_flops(results, None)
    table = format_table(results)
    assert "smolthink / TRL seconds per step (medians): 0.25x" in table
    assert "250 tok/s x 0.00 GFLOP/token = 1 GFLOP/s = 50% of the GEMM limit at 2048 rows" in table
    assert "computed tokens" not in table  # no separate line when nothing was shared
    results["grpo"]["smolthink"]["train_computed_tok_s_summary"] = {"median": 150.0, "n": 3}
    results["training_flops"] = training_flops(results, None)
    table = format_table(results)
    assert "computed tokens (what the forwards ran; prompts once per chunk): 150 tok/s" in table
    assert "= 30% of the GEMM limit" in table


def test_training_flops_is_four_n_per_token_against_the_2048_row_limit():
    results = {"gemm": {"limit_gflops_2048": 400.0, "mkl_m2048": {"median": 200.0}}, "model": {"n_params": 1e8},
               "grpo": {"smolthink": {"train_tok_s_summary": {"median": 500.0}}}}
    tf = training_flops(results, None)
    assert tf["gflops"] == pytest.approx(500 * 4e8 / 1e9)  # 200 GFLOP/s
    assert tf["pct_limit"] == pytest.approx(50.0) and tf["pct_mkl_2048"] == pytest.approx(100.0)
    assert tf["computed_pct_limit"] == pytest.approx(50.0)  # no computed-token figure: the same tokens
    results["grpo"]["smolthink"]["train_computed_tok_s_summary"] = {"median": 300.0}
    assert training_flops(results, None)["computed_pct_limit"] == pytest.approx(30.0)
    assert training_flops({"gemm": {}, "grpo": {}}, None) is None


def test_parser_defaults_are_the_recipe_shape():
    a = build_parser().parse_args(["bench"])
    assert (a.prompts, a.group, a.max_new_tokens, a.temperature, a.top_p) == (8, 6, 300, 0.7, 0.95)


def test_main_parser_gives_the_bench_namespace_it_had_before():
    a = build_parser().parse_args(["bench", "--parts", "flops,rollout", "--reps", "2", "--set", "a=1"])
    assert {k: getattr(a, k) for k in OLD_NAMESPACE} == OLD_NAMESPACE
    assert a.func is cmd_bench


def test_results_args_are_the_bench_flags_only():
    """results.json's "args": every user flag, no CLI plumbing (func is not JSON) and no child flags."""
    a = build_parser().parse_args(["-v", "bench", "--reps", "2", "--child", "trl", "--child-out", "x.json"])
    opts = bench.bench_options(a)
    assert list(opts) == [k for k in OLD_NAMESPACE if not k.startswith("child")] + list(NEW_FLAGS)
    assert {k: opts[k] for k in NEW_FLAGS} == NEW_FLAGS
    assert opts["reps"] == 2 and json.loads(json.dumps(opts)) == opts


def test_child_argv_parses_back_to_the_same_flags():
    a = build_parser().parse_args(["bench", "--model=-odd-dir", "--temperature", "0.3", "--top-p", "1e-05",
                                   "--grpo", "smolthink", "--max-tokens-per-forward", "512", "--set", "a=1",
                                   "--set", "lr=-2", "--out", "o.json"])
    words = bench.bench_argv(a)
    b = build_parser().parse_args(["bench", *words, "--child", "smolthink", "--child-out", "c.json"])
    assert bench.bench_options(b) == bench.bench_options(a)
    assert (b.model, b.top_p, b.sets, b.max_tokens_per_forward) == ("-odd-dir", 1e-05, ["a=1", "lr=-2"], 512)
    assert (b.child, b.child_out) == ("smolthink", "c.json")
    assert not any(w.startswith("--child") for w in words)
    defaults = bench.bench_argv(build_parser().parse_args(["bench"]))
    assert not any(w.startswith(("--model", "--set", "--max-tokens-per-forward")) for w in defaults)


def test_grpo_bench_starts_each_side_with_the_bench_flags_and_skips_the_warmup_step(monkeypatch):
    calls = []

    def fake_run(cmd, **_):
        calls.append(cmd)
        side, out = cmd[cmd.index("--child") + 1], cmd[cmd.index("--child-out") + 1]
        if side == "trl":
            return type("P", (), {"returncode": -9, "stderr": "Killed", "stdout": ""})()
        steps = [{"step": i, "rollout_s": 9.0 if i == 1 else 1.0, "train_s": 2.0} for i in (1, 2, 3)]
        with open(out, "w") as f:
            json.dump({"side": side, "per_step": steps}, f)
        return type("P", (), {"returncode": 0, "stderr": "", "stdout": ""})()

    monkeypatch.setattr(grpo.subprocess, "run", fake_run)
    a = build_parser().parse_args(["bench", "--grpo", "trl,smolthink", "--reps", "2"])
    res = grpo.grpo_bench(a, bench.bench_argv(a))
    assert [c[:3] for c in calls] == [[sys.executable, "-m", "smolthink.bench"]] * 2
    child = build_parser().parse_args(["bench", *calls[1][3:]])
    assert bench.bench_options(child) == bench.bench_options(a) and child.child == "smolthink"
    assert res["trl"] == {"available": False, "reason": "killed by SIGKILL (out of memory?): Killed"}
    assert res["smolthink"]["step_s_summary"] == {"median": 3.0, "min": 3.0, "max": 3.0, "n": 2}


def test_child_flag_runs_one_side_and_writes_its_result(monkeypatch, tmp_path):
    monkeypatch.setattr("smolthink.runtime.set_threads", lambda n: 1)
    monkeypatch.setattr(grpo, "_child_smolthink", lambda args: {"side": "smolthink", "prompts": args.prompts})
    out = tmp_path / "child.json"
    a = build_parser().parse_args(["bench", "--prompts=3", "--child", "smolthink", "--child-out", str(out)])
    assert bench.main(a) == 0
    assert json.loads(out.read_text()) == {"side": "smolthink", "prompts": 3}


def test_python_dash_m_entry_uses_the_main_parser():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the smolthink these tests import
    proc = subprocess.run([sys.executable, "-m", "smolthink.bench", "--help"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0 and "usage: smolthink bench" in proc.stdout and "--grpo-steps" in proc.stdout


def test_cli_hands_leading_options_to_the_bench(capsys):
    """`smolthink bench --parts grpo ...` reaches the bench parser (argparse's REMAINDER alone drops it)."""
    from smolthink.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--parts", "grpo", "--grpo-steps", "1", "--help"])
    assert e.value.code == 0 and "--grpo-steps" in capsys.readouterr().out


def test_flops_part_at_a_tiny_size_states_both_decode_bounds():
    from smolthink.bench.limits import decode_bounds, gemm_limit, memory_bandwidth
    from smolthink.onednn import bf16_runs

    g = gemm_limit(reps=1, rows=(4, 8), k=32, n=64, work=1e4, streamed=2)
    bf16 = ("bf16_plain", "bf16_packed")
    for M in (4, 8):
        for name in ("mkl", "onednn", "onednn_plain") + (bf16 if bf16_runs() else ()):
            assert g[f"{name}_m{M}"]["median"] > 0
        assert g[f"limit_gflops_{M}"] == max(g[f"{b}_m{M}"]["median"] for b in ("mkl", "onednn", "onednn_plain"))
        if bf16_runs():
            assert g[f"limit_bf16_gflops_{M}"] == max(g[f"{b}_m{M}"]["median"] for b in bf16)
        else:  # an AVX2-only CPU: no bf16 rows, and the table below still renders
            assert not any(key.startswith(bf16) or key.startswith("limit_bf16") for key in g)
    assert g["onednn_m4_streamed"]["n"] == 1
    bw = memory_bandwidth(nbytes=1 << 16, reps=1)
    assert bw["copy_gb_s"]["median"] > 0
    g["limit_gflops_48"], g["limit_bf16_gflops_48"] = 400.0, 800.0
    db = decode_bounds(g, 20.0, n_params=100_000_000, kv_bytes_per_token=46080)
    # FLOP bound: 400e9 / 2e8 = 2000 tok/s = 41.7 steps/s at 48 rows; bandwidth: 20e9 / 4e8 = 50 steps/s fp32
    assert db["fp32"]["flop_tok_s"] == pytest.approx(2000) and db["fp32"]["flop_steps_s"] == pytest.approx(2000 / 48)
    assert db["fp32"]["bandwidth_steps_s"] == pytest.approx(50)
    assert db["bf16"]["bandwidth_steps_s"] == pytest.approx(100)
    assert db["bf16"]["flop_tok_s"] == pytest.approx(4000) and db["bf16"]["weight_bytes_per_step"] == 2e8
    assert db["fp32"]["kv_bytes_per_step"] == 48 * 300 * 46080 and db["bf16"]["kv_bytes_per_step"] == 48 * 300 * 23040
    table = format_table({"machine": {}, "gemm": g, "model": {}, "bandwidth": bw, "decode_bounds": db})
    measured_bf16 = ("oneDNN bf16 packed  M=8", "best bf16 / best fp32 at M=8")
    for needle in (measured_bf16 if bf16_runs() else ()) + (
            "streaming copy of 0 MB",
            "fp32: FLOP bound 41.7 steps/s = 2000 tok/s; bandwidth bound 50.0 steps/s = 2400 tok/s (400 MB",
            "bf16: FLOP bound 83.3 steps/s = 4000 tok/s; bandwidth bound 100.0 steps/s"):
        assert needle in table
    assert bf16_runs() or not any(needle in table for needle in measured_bf16)


def test_contention_help_parses(capsys):
    from smolthink.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--contention", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--contention-threads" in out and "--contention-policies" in out
    a = build_parser().parse_args(["bench", "--contention", "--contention-threads", "2,0"])
    assert a.contention and a.contention_threads == "2,0"
    words = bench.bench_argv(a)
    assert "--contention" in words and not any(w.startswith("--contention=") for w in words)
    assert build_parser().parse_args(["bench", *words]).contention


def test_contention_children_get_the_policy_and_threads_and_a_spinner_when_busy(monkeypatch):
    from smolthink.bench import contention

    calls, spinners = [], []

    class Spinner:
        def __init__(self, cmd):
            spinners.append(cmd)

        def kill(self):
            spinners.append("killed")

        def wait(self):
            pass

    def fake_run(cmd, env, **_):
        calls.append((cmd, env))
        out = cmd[cmd.index("--child-out") + 1]
        threads = int([w for w in cmd if w.startswith("--threads=")][-1].split("=")[1])
        busy = bool(spinners) and spinners[-1] != "killed"
        tok = 100.0 / (2 if busy else 1) * (threads or 1)
        with open(out, "w") as f:
            json.dump({"rollout_tok_s": tok, "train_tok_s": tok / 2, "threads_rollout": threads or 1,
                       "threads_train": threads or 1}, f)
        return type("P", (), {"returncode": 0, "stderr": "", "stdout": ""})()

    monkeypatch.setattr(contention.subprocess, "Popen", Spinner)
    monkeypatch.setattr(contention.subprocess, "run", fake_run)
    monkeypatch.setattr(contention.time, "sleep", lambda s: None)
    a = build_parser().parse_args(["bench", "--contention", "--reps", "1", "--contention-threads", "2,1",
                                   "--contention-policies", "passive,default"])
    res = contention.contention_bench(a, ["--threads=0"])
    assert len(calls) == 2 * 2 * 2 and spinners.count("killed") == 4
    assert spinners[0] == [sys.executable, "-c", "while True: pass"]
    envs = [env for _, env in calls]
    assert envs[0]["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in envs[0]
    assert "GOMP_SPINCOUNT" not in envs[-1] and "OMP_WAIT_POLICY" not in envs[-1]
    row = next(r for r in res["summary"] if (r["policy"], r["threads"]) == ("passive", 2))
    assert row["rollout_tok_s"]["busy_over_quiet"] == pytest.approx(0.5)
    assert row["rollout_tok_s"]["busy_over_best_quiet"] == pytest.approx(0.5)
    one = next(r for r in res["summary"] if (r["policy"], r["threads"]) == ("passive", 1))
    assert one["train_tok_s"]["busy_over_best_quiet"] == pytest.approx(0.25)
    table = format_table({"machine": {}, "contention": res})
    assert "(d) contention" in table and "passive" in table and "50%" in table
