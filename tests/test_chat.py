from smolthink.chat import answer_label, build_messages, extract_answer, format_ok, render_prompt
from smolthink.tasks import strict_match


def test_extract_takes_last_answer_block():
    text = "<think> a </think> <answer> No </answer> then <answer>  Yes \n</answer>"
    assert extract_answer(text) == "Yes"
    assert extract_answer("no tags at all") is None
    assert extract_answer("<answer></answer>") == ""


def test_extract_reads_blocks_as_the_lazy_regex_does():
    """Every answer the old `re.findall(r"<answer>(.*?)</answer>")[-1]` reading gave, on random tag soup."""
    import random
    import re

    lazy = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "x", " Yes ", "\n", "<answer", "answer>", "</", "<"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(14)))
        found = lazy.findall(text)
        assert extract_answer(text) == (found[-1].strip() if found else None), text


def test_extract_on_a_256kb_completion_of_unclosed_openings():
    text = "<answer>" * 32768  # 256 KB; the lazy regex rescanned the rest of the text from every opening
    assert extract_answer(text) is None
    assert extract_answer(text + " Yes </answer>") == "<answer>" * 32767 + " Yes"
    assert extract_answer("<answer> No </answer>" + text) == "No"
    assert extract_answer(text[:-8] + "</answer>" + text) == "<answer>" * 32766


def test_format_strict_accepts_exact_layout_with_whitespace():
    assert format_ok("<think> step 1 </think> <answer> Yes </answer>")
    assert format_ok("\n<think>\nreason here\n</think>\n\n<answer>No</answer>\n")


def test_format_rejects_extra_text_missing_or_repeated_blocks():
    assert not format_ok("Sure! <think> x </think> <answer> Yes </answer>")
    assert not format_ok("<think> x </think> <answer> Yes </answer> trailing")
    assert not format_ok("<think> x </think>")
    assert not format_ok("<answer> Yes </answer>")
    assert not format_ok("<think> x </think> <think> y </think> <answer> Yes </answer>")
    assert not format_ok("<think> x </think> <answer> Yes </answer> <answer> No </answer>")
    assert not format_ok("<answer> Yes </answer> <think> x </think>")
    assert not format_ok("<think>  </think> <answer> Yes </answer>")  # empty reasoning
    assert not format_ok("<think> x </think> <answer>  </answer>")  # empty answer
    assert not format_ok("<think> x <answer> Yes </answer> </think> <answer> Yes </answer>")


def test_format_with_template_prefilled_think():
    completion = "reasoning here </think> <answer> Yes </answer>"
    assert not format_ok(completion)
    assert format_ok(completion, prefill="<think>\n")


def test_render_prompt_uses_chat_template(tiny_tokenizer):
    ids = render_prompt(tiny_tokenizer, build_messages("Is it?"))
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    assert "<think>" in text and "Is it?" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_few_shot_messages_alternate():
    msgs = build_messages("Q2", few_shot=[("Q1", "<think> t </think> <answer> A </answer>")])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]


def test_answer_label():
    assert answer_label(" yes. ") == "Yes" and answer_label("NO") == "No" and answer_label("") is None
    assert answer_label(None) is None and answer_label("42") == "42"


def test_answer_label_classes_are_what_the_reward_matches():
    """Same label as the gold exactly when the reward's strict match accepts the answer."""
    cases = [("valid.", "Valid"), ("Valid", "valid"), ("INVALID", "Invalid"), ("Yes..", "Yes"), ("yes .", "Yes"),
             ("true", "True"), ("No, because", "No"), ("(p ∧ q)", "(P ∧ Q)"), ("(P ∧ Q).", "(P ∧ Q)"),
             ("maybe", "Yes")]
    for answer, gold in cases:
        assert (answer_label(answer, gold) == answer_label(gold, gold)) == strict_match(answer, gold), (answer, gold)
    assert answer_label("valid.") == "Valid" and answer_label("Yes..") == "Yes.."
    assert answer_label("maybe", "Yes") == "Maybe" and answer_label("maybe") == "maybe"


def test_format_needs_real_content_not_the_prompts_placeholders():
    """The default syllogism model answers other tasks with the system prompt's example filled in: tags, no
    content. That is format 0, for the reward and the eval alike."""
    from smolthink.chat import SYSTEM_PROMPT
    from smolthink.config import RewardConfig
    from smolthink.rewards import score_completions
    from smolthink.types import Example

    copied = "<think> Your reasoning </think> <answer> one </answer>"
    assert "<think> your reasoning </think>" in SYSTEM_PROMPT  # the placeholder the rule names
    assert not format_ok(copied)
    assert not format_ok("<think> your reasoning here. </think> <answer> 3 </answer>")  # one word beside it
    assert not format_ok("<think> x </think> <answer> Yes </answer>")  # one token is no reasoning
    assert not format_ok("<think> ... !! </think> <answer> Yes </answer>")  # punctuation is no word
    assert not format_ok("<think> count the letters </think> <answer> Your answer. </answer>")
    assert format_ok("<think> count the letters </think> <answer> 3 </answer>")
    assert format_ok("<think> Your reasoning: two r's </think> <answer> 2 </answer>")  # content beside it
    assert format_ok("it has 3 </think> <answer> 3 </answer>", prefill="<think>\n")
    ex = Example(id="0", task="letter_counting", question="q", answer="one", entry={})
    (parts,) = score_completions([copied], [ex], [10], None, [], RewardConfig(), 64)
    assert parts.format == 0.0 and parts.correct == 1.0  # an exact match needs no scorer
