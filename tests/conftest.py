import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct (converted from the GGUF once, then cached)."""
    from smolthink.models import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def tiny_tokenizer(embedded):
    """The real SmolLM2 tokenizer (chat template, pad == eos)."""
    return embedded[1]


@pytest.fixture()
def tiny_lm(tiny_tokenizer):
    """A tiny random Llama with the real tokenizer's vocabulary (fast, no download)."""
    from tiny import tiny_model

    return tiny_model(vocab_size=len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny random Llama + the real tokenizer, loadable by every `--model` path (tests only read it)."""
    from tiny import tiny_model

    d = tmp_path_factory.mktemp("tiny")
    tiny_model(vocab_size=len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tests (they opt in with `pytestmark = pytest.mark.usefixtures(
    "one_thread")`): on a shared 2-core machine two OpenMP threads stall each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _syllogism_trace(entry):
    m = entry["metadata"]
    answer = entry["answer"]
    return (f"<think> Premise 1: {m['premise1']}. Premise 2: {m['premise2']}. The conclusion '{m['conclusion']}' "
            f"{'follows' if answer == 'Yes' else 'does not follow'}. </think> <answer>{answer}</answer>")


@pytest.fixture(scope="session")
def traces(tmp_path_factory):
    """8 verified syllogism traces (written through make_traces with a template solver)."""
    from smolthink.config import DataConfig
    from smolthink.data import make_traces
    from smolthink.tasks import parse_tasks

    path = tmp_path_factory.mktemp("data") / "traces.jsonl"
    stats = make_traces(DataConfig(num_traces=8), parse_tasks("syllogism"), 0, path,
                        solver=lambda task, entry, rng: _syllogism_trace(entry))
    assert stats["kept"] == 8
    return path
