"""The think/answer protocol: system prompt, prompt rendering with the chat template, answer extraction, answer
normalisation (the one definition the reward, the eval summary and the report share) and the strict format check."""
from __future__ import annotations

import re
from typing import Any, Sequence

# The system prompt's example blocks: a completion that copies them has the tags but no content (format_ok).
PLACEHOLDER_THINK, PLACEHOLDER_ANSWER = "your reasoning", "your answer"
SYSTEM_PROMPT = (
    "You are a careful reasoner. First think about the question step by step inside <think> </think> tags, "
    "then give only the final answer inside <answer> </answer> tags, like this:\n"
    f"<think> {PLACEHOLDER_THINK} </think> <answer> {PLACEHOLDER_ANSWER} </answer>\n"
    "Your answer is scored by extracting the text between the answer tags, so put nothing else there. "
    "Do not write code."
)

# Answers that are case-insensitive by nature: "yes" answers "Yes".
CASE_FREE_ANSWERS = frozenset({"yes", "no", "true", "false", "valid", "invalid"})
_WS = re.compile(r"\s+")
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# Exactly one think block then one answer block, nothing but whitespace around or between them, and no stray tags
# inside either block.
_FORMAT_RE = re.compile(
    r"\A\s*<think>((?:(?!</?think>|</?answer>).)*)</think>\s*<answer>((?:(?!</?think>|</?answer>).)*)</answer>\s*\Z",
    re.DOTALL,
)
_WORD = re.compile(r"[^\W_]+")  # a run of letters or digits
MIN_THINK_WORDS = 2  # one token ("x", "reason", "...") is not a reason; two words can state one step


def extract_answer(completion: str) -> str | None:
    """Return the stripped text of the last <answer>...</answer> block, or None when there is none.

    Blocks are read left to right, each from the first <answer> after the previous block to the first </answer>
    after that (an <answer> inside a block is part of its text). str.find scans each character about once, where
    a lazy regex rescans the rest of the text from every unclosed <answer>: quadratic on a long completion."""
    found, pos = None, 0
    while (start := completion.find(ANSWER_OPEN, pos)) >= 0:
        end = completion.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end < 0:
            break  # no later block can close either
        found, pos = completion[start + len(ANSWER_OPEN) : end], end + len(ANSWER_CLOSE)
    return found.strip() if found is not None else None


def normalize_answer(text: str, case_free: bool) -> str:
    """Trim, collapse inner whitespace, drop one trailing period ("Yes.." stays "Yes.."); casefold when the
    answer is case-free."""
    text = _WS.sub(" ", text.strip())
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text.casefold() if case_free else text


def is_case_free(text: str) -> bool:
    """True when `text` normalises to one of CASE_FREE_ANSWERS (compared without regard to case)."""
    return normalize_answer(text, case_free=True) in CASE_FREE_ANSWERS


def answer_label(answer: Any, gold: Any = None) -> str | None:
    """The class of a predicted answer, normalised exactly as the reward compares it, with case-free answers
    capitalised ("valid." -> "Valid"); None for no answer or an empty one. Case-freedom comes from the gold
    when given (as in the reward's match), else from the answer itself. Values read from JSON may be numbers."""
    if answer is None:
        return None
    text = str(answer)
    case_free = is_case_free(str(gold) if gold is not None else text)
    label = normalize_answer(text, case_free)
    if not label:
        return None
    return label.capitalize() if case_free else label


def _words(text: str) -> list[str]:
    """The casefolded words (runs of letters or digits) of a text: punctuation and case never matter."""
    return _WORD.findall(text.casefold())


def format_ok(completion: str, prefill: str = "") -> bool:
    """Strict format check with real content: `<think> ... </think> <answer> ... </answer>` and nothing else but
    whitespace, where
    - the think block holds at least MIN_THINK_WORDS words (runs of letters or digits) besides the system
      prompt's placeholder "your reasoning": a copy of the prompt's example ("<think> Your reasoning </think>") or
      a one-token think block has the tags but no reasoning;
    - the answer block is non-empty and not the placeholder "your answer" (case and punctuation ignored).
    The reward's format part and the eval's format rate both come from here.

    `prefill` is text the chat template already put at the start of the assistant turn (for example "<think>\\n"
    in templates that open the think block themselves); it is prepended so such completions are not penalised.
    """
    m = _FORMAT_RE.match(prefill + completion)
    if not m or not m.group(2).strip() or _words(m.group(2)) == _words(PLACEHOLDER_ANSWER):
        return False
    think = re.sub(rf"\b{PLACEHOLDER_THINK}\b", " ", " ".join(_words(m.group(1))))
    return len(think.split()) >= MIN_THINK_WORDS


def build_messages(
    question: str,
    system_prompt: str | None = SYSTEM_PROMPT,
    few_shot: Sequence[tuple[str, str]] = (),
) -> list[dict[str, str]]:
    """Chat messages for one question: system prompt, optional few-shot (question, completion) pairs, question."""
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for q, a in few_shot:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return messages


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant turn's opening (generation prompt)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def template_prefill(tokenizer: Any) -> str:
    """Text a chat template writes after the generation prompt opening, e.g. "<think>\\n" for templates that
    pre-fill the think block; "" for SmolLM2. Found by rendering a probe conversation."""
    probe = [{"role": "user", "content": "x"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    # A template that opens <think> leaves it as the last non-empty piece of the generation prompt.
    stripped = text.rstrip()
    return "<think>\n" if stripped.endswith("<think>") else ""


def format_trace(steps: list[str], answer: str) -> str:
    """A warm-up trace in the protocol's format: the sentences (each capitalised) in the think block, then the
    answer block."""
    text = " ".join(st[:1].upper() + st[1:] for st in steps)
    return f"<think> {text} </think> <answer> {answer} </answer>"
