from pathlib import Path

import pytest

from smolthink.config import (EvalRunConfig, GRPOConfig, PipelineConfig, SFTConfig, build_config,
                              build_pipeline_config, stage_config)
from smolthink.configlib import config_yaml, load_yaml, parse_overrides
from smolthink.errors import SmolthinkError


def test_overrides_are_typed():
    cfg = build_config(GRPOConfig, [{"max_steps": 3}, parse_overrides(["beta=0.04", "use_lora=false",
                                                                        "epsilon_high=0.28", "learning_rate=1e-6"])])
    assert cfg.max_steps == 3 and cfg.beta == 0.04 and cfg.use_lora is False and cfg.epsilon_high == 0.28
    assert cfg.learning_rate == 1e-6  # YAML reads "1e-6" as a string: still a number here


def test_sections_take_nested_and_dotted_keys_later_wins():
    cfg = build_config(GRPOConfig, [{"eval": {"n": 7, "every": 2}}, {"eval.n": 9}, {"reward": {"functions": ["m:f"]}}])
    assert (cfg.eval.n, cfg.eval.every, cfg.reward.functions) == (9, 2, ["m:f"])
    assert cfg.eval.balanced is True and cfg.reward.correct_weight == 0.85  # untouched keys keep their defaults


def test_moved_flat_keys_still_load():
    cfg = build_config(SFTConfig, [{"eval_n": 64, "num_traces": 32, "correct_weight": 0.5, "packed_linears": False}])
    assert (cfg.eval.n, cfg.data.num_traces, cfg.reward.correct_weight, cfg.onednn_linears) == (64, 32, 0.5, False)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = build_config(GRPOConfig, [{"eval.n": 5, "task": "syllogism:2,propositional_logic:1"}])
    p = tmp_path / "config.yaml"
    p.write_text(config_yaml(cfg))
    assert build_config(GRPOConfig, [load_yaml(p)]) == cfg


@pytest.mark.parametrize("bad,msg", [
    ({"learnig_rate": 1e-6}, "did you mean 'learning_rate'"),
    ({"eval.nn": 1}, "did you mean 'eval.n'"),
    ({"num_generations": 1}, r"num_generations: 1 \(expected value >= 2\)"),
    ({"loss_type": "ppo"}, "loss_type: 'ppo' .expected one of grpo | dapo | dr_grpo"),
    ({"precision": "fp16"}, "precision: 'fp16' .expected one of fp32 | bf16"),
    ({"precision": "bf16", "onednn_linears": False}, "precision=bf16 needs onednn_linears=true and use_lora=true"),
    ({"precision": "bf16", "use_lora": False}, "precision=bf16 needs onednn_linears=true and use_lora=true"),
    ({"temperature": 0.0}, "temperature"),
    ({"buffer_size": 4, "minibatch_size": 8}, "buffer_size must be >= minibatch_size"),
    ({"max_steps": "many"}, "bad value for max_steps"),
    ({"max_steps": 2.5}, "bad value for max_steps: 2.5 .expected an integer"),
    ({"use_lora": "maybe"}, "bad value for use_lora"),
    ({"top_p": 1.5}, "top_p"),
    ({"correct_weight": float("nan")}, "reward.correct_weight: nan .expected a finite number"),
    ({"learning_rate": float("inf")}, "learning_rate: inf .expected a finite number"),
    ({"learning_rate": "nan"}, "learning_rate: 'nan' .expected a finite number"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm"),
    ({"top_k": -5}, r"top_k: -5 \(expected value >= 0\)"),
    ({"lora_dropout": 2}, r"lora_dropout: 2 \(expected 0 <= value < 1\)"),
    ({"adam_beta1": 1.5}, "adam_beta1"),
    ({"weight_decay": -1}, "weight_decay"),
    ({"log_every": 0}, "log_every"),
    ({"lora_target_modules": "q_proj"}, "lora_target_modules: 'q_proj' .expected a list of strings"),
    ({"lora_target_modules": [1, 2]}, "expected a list of strings"),
    ({"model": 5}, "model: 5 .expected a string"),
    ({"eval": 5}, "section 'eval' takes a mapping"),
    ({"max_steps.x": 1}, "not a section"),
    ({"task": "syllogism:abc"}, "mixture weight for task 'syllogism': 'abc'"),
    ({"task": "syllogism:nan"}, "mixture weight"),
    ({"task": "syllogism:0"}, "mixture weight"),
    ({"task": "syllogism:-1,propositional_logic:1"}, "mixture weight"),
    ({"task": "syllogism:inf"}, "mixture weight"),
    ({"task": "nosuchtask"}, "unknown task 'nosuchtask'"),
    ({"eval.samples": 4}, "eval.samples > 1 needs eval.temperature > 0"),
    ({"reward.scorer_timeout": float("nan")}, "scorer_timeout"),
    ({"max_steps": 10**5000}, "max_steps"),
])
def test_bad_configs_fail_with_one_line(bad, msg):
    with pytest.raises(SmolthinkError, match=msg) as e:
        build_config(GRPOConfig, [bad])
    assert "\n" not in str(e.value)


def test_recipe_yaml_loads():
    cfg = build_config(GRPOConfig, [load_yaml(Path(__file__).parents[1] / "configs" / "recipe_syllogism.yaml")])
    assert (cfg.prompts_per_rollout, cfg.num_generations, cfg.max_completion_length) == (8, 6, 300)
    assert (cfg.minibatch_size, cfg.gradient_accumulation_steps, cfg.buffer_size) == (16, 12, 500)
    assert cfg.learning_rate == 1e-6 and cfg.temperature == 0.7 and cfg.top_p == 0.95


def test_bad_yaml_files(tmp_path):
    with pytest.raises(SmolthinkError, match="not found"):
        load_yaml("/nonexistent.yaml")
    with pytest.raises(SmolthinkError, match="is a directory"):
        load_yaml(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    with pytest.raises(SmolthinkError, match="not UTF-8"):
        load_yaml(tmp_path / "bin.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SmolthinkError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(SmolthinkError, match="key=value"):
        parse_overrides(["oops"])
    assert build_config(SFTConfig, []).lora_r == 32


def test_pipeline_sections_reach_the_stages():
    cfg = build_pipeline_config([{"eval_n": 64, "num_traces": 16, "sft.learning_rate": 1e-4,
                                  "grpo": {"max_steps": 3, "eval": {"every": 1}}}])
    assert isinstance(cfg, PipelineConfig) and cfg.data.num_traces == 16
    sft = stage_config(cfg, SFTConfig, **{"data.path": "t.jsonl"})
    grpo = stage_config(cfg, GRPOConfig, model="m")
    assert (sft.eval.n, sft.learning_rate, sft.data.path, sft.data.num_traces) == (64, 1e-4, "t.jsonl", 16)
    assert (grpo.eval.n, grpo.eval.every, grpo.max_steps, grpo.model) == (64, 1, 3, "m")
    with pytest.raises(SmolthinkError, match="sft"):  # a section that is not a mapping
        build_pipeline_config([{"sft": 5}])
    with pytest.raises(SmolthinkError, match="grpo: section: .*learnig_rate"):  # fails up front, naming the section
        build_pipeline_config([{"grpo.learnig_rate": 1}])
    with pytest.raises(SmolthinkError, match="sft: section: unknown config key 'engine'"):  # a GRPO-only key
        build_pipeline_config([{"sft.engine": "hf"}])


def test_eval_command_config():
    cfg = build_config(EvalRunConfig, [{"eval.n": 10, "eval.samples": 4, "eval.temperature": 0.7}])
    assert (cfg.eval.n, cfg.eval.samples, cfg.eval.temperature) == (10, 4, 0.7)
    for bad in ({"eval.n": -5}, {"eval.top_p": 2}, {"eval.temperature": float("nan")}, {"eval.max_new_tokens": 0},
                {"eval.temperature": -1}, {"eval.batch_size": -1}, {"eval.samples": 0}):
        with pytest.raises(SmolthinkError, match=list(bad)[0]):
            build_config(EvalRunConfig, [bad])


PIPELINE_CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml")
                          if p.name != "recipe_syllogism.yaml")  # that one is a `smolthink train` config


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.stem)
def test_shipped_pipeline_configs_build(path):
    """Every pipeline config in configs/ builds (its sft and grpo sections too), names real reasoning-gym tasks
    with settings they accept, and yields the distinct held-out and GRPO train questions it asks for (a typo or a
    too-narrow range fails here, not an hour into a run)."""
    from smolthink.pipeline import check_question_supply
    from smolthink.tasks import check_config, parse_tasks

    cfg = build_pipeline_config([load_yaml(path)])
    for spec in parse_tasks(cfg.task):
        check_config(spec)
    check_question_supply(cfg)
