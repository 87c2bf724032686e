import pytest

from smolthink.config import GRPOConfig, SFTConfig, build_config, load_yaml, parse_overrides
from smolthink.errors import SmolthinkError


def test_overrides_are_typed():
    cfg = build_config(GRPOConfig, [{"max_steps": 3}, parse_overrides(["beta=0.04", "use_lora=false",
                                                                        "epsilon_high=0.28"])])
    assert cfg.max_steps == 3 and cfg.beta == 0.04 and cfg.use_lora is False and cfg.epsilon_high == 0.28


@pytest.mark.parametrize("bad,msg", [
    ({"learnig_rate": 1e-6}, "did you mean 'learning_rate'"),
    ({"num_generations": 1}, "num_generations must be >= 2"),
    ({"loss_type": "ppo"}, "loss_type"),
    ({"temperature": 0.0}, "temperature"),
    ({"buffer_size": 4, "minibatch_size": 8}, "buffer_size must be >= minibatch_size"),
    ({"max_steps": "many"}, "bad value for max_steps"),
    ({"use_lora": "maybe"}, "bad value for use_lora"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_configs_fail_with_one_line(bad, msg):
    with pytest.raises(SmolthinkError, match=msg):
        build_config(GRPOConfig, [bad])


def test_recipe_yaml_loads():
    from pathlib import Path

    cfg = build_config(GRPOConfig, [load_yaml(Path(__file__).parents[1] / "configs" / "recipe_syllogism.yaml")])
    assert (cfg.prompts_per_rollout, cfg.num_generations, cfg.max_completion_length) == (8, 6, 300)
    assert (cfg.minibatch_size, cfg.gradient_accumulation_steps, cfg.buffer_size) == (16, 12, 500)
    assert cfg.learning_rate == 1e-6 and cfg.temperature == 0.7 and cfg.top_p == 0.95


def test_missing_yaml_and_bad_set():
    with pytest.raises(SmolthinkError, match="not found"):
        load_yaml("/nonexistent.yaml")
    with pytest.raises(SmolthinkError, match="key=value"):
        parse_overrides(["oops"])
    assert build_config(SFTConfig, []).lora_r == 32


def test_renamed_key_still_loads_from_an_old_config():
    cfg = build_config(GRPOConfig, [{"packed_linears": False}])  # what session-3 run directories hold
    assert cfg.onednn_linears is False
