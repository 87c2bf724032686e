"""bench helpers: summaries, the reward used on the TRL side, the table (no timings asserted)."""
import pytest
from smolthink.bench import build_parser, format_table, strict_syllogism_reward, summarize, training_flops


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
    a = build_parser().parse_args([])
    assert (a.prompts, a.group, a.max_new_tokens, a.temperature, a.top_p) == (8, 6, 300, 0.7, 0.95)


def test_cli_hands_leading_options_to_the_bench(capsys):
    """`smolthink bench --parts grpo ...` reaches the bench parser (argparse's REMAINDER alone drops it)."""
    from smolthink.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--parts", "grpo", "--grpo-steps", "1", "--help"])
    assert e.value.code == 0 and "--grpo-steps" in capsys.readouterr().out
