"""Toy reward functions for tests (importable as `toy_rewards:...` with tests/ on sys.path)."""


def spaces(completion: str, example) -> float:
    """Dense toy reward: share of characters that are spaces (x5). A tiny random model can raise it quickly by
    preferring word-initial tokens."""
    return 5.0 * completion.count(" ") / max(1, len(completion))


def spaces_on_yes(completion: str, example) -> float:
    """`spaces` on questions whose answer is Yes, 0 elsewhere: half of the groups carry signal, half none."""
    return spaces(completion, example) if example.answer == "Yes" else 0.0


def raises(completion: str, example) -> float:
    """A user reward function that always fails: must score 0 and never kill the run."""
    raise RuntimeError("boom")


def nan_on_spaces(completion: str, example) -> float:
    """A user reward function that returns NaN on completions with a space (most of them) and 1.0 otherwise:
    each NaN must score 0, never poison its group's advantages."""
    return float("nan") if " " in completion else 1.0
