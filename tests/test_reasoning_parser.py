"""Reasoning parser (`<think>...</think>`, Qwen3 / DeepSeek-R1) on canned outputs: the whole-output
split, streams split at every chunk boundary (and at random ones) that add up to it, and the
reasoning parser feeding a tool-call parser."""

import random

import pytest

from forge.tools import (
    ContentDelta,
    ReasoningDelta,
    ReasoningParser,
    ToolCallDelta,
    assemble,
    call_id_factory,
    detect_reasoning_parser,
    get_reasoning_parser,
    get_tool_parser,
    prompt_opens_reasoning,
)
from forge.tools.reasoning import assemble_reasoning

# (output starts inside the reasoning?, output text, expected reasoning_content, expected content)
CASES = [
    (False, "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nThe answer is 4.", "The user wants 2+2. That is 4.",
     "The answer is 4."),
    (False, "The answer is 4.", "", "The answer is 4."),  # Qwen3 with enable_thinking=False
    (False, "<think>\n\n</think>\n\nHi!", "", "Hi!"),
    (False, "\n\n<think>a\n\nb</think>c\n", "a\n\nb", "c\n"),
    (False, "<think>\nStill thinking about", "Still thinking about", ""),  # cut off by max_tokens
    (False, "<think>考虑一下 😀 naïve</think>答案是 4 ✓", "考虑一下 😀 naïve", "答案是 4 ✓"),
    (False, "<think>Tags like </thin k> or < /think> are text.</think>ok", "Tags like </thin k> or < /think> are text.", "ok"),
    (False, "<think>a</think>b</think>c", "a", "b</think>c"),
    (False, "Answer: <think>not reasoning</think>", "", "Answer: <think>not reasoning</think>"),
    (False, "<thi is not a tag", "", "<thi is not a tag"),
    (False, "  ", "", "  "),
    (False, "", "", ""),
    # DeepSeek-R1-0528 / Qwen3-Thinking-2507: the prompt already opened <think>
    (True, "Okay, 2+2.\nIt is 4.\n</think>\n\n**4**", "Okay, 2+2.\nIt is 4.", "**4**"),
    (True, "<think>\nHmm.</think>4", "Hmm.", "4"),
    (True, "never closes ", "never closes", ""),
    (True, "</think>direct", "", "direct"),
    (True, "", "", ""),
]


def _stream(starts_in_reasoning, pieces):
    parser = ReasoningParser(starts_in_reasoning)
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    return deltas + parser.finish()


def _splits(text, rng):
    yield [text]
    yield list(text)
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("starts,text,reasoning,content", CASES)
def test_extract(starts, text, reasoning, content):
    assert ReasoningParser(starts).extract(text) == (reasoning, content)


@pytest.mark.parametrize("starts,text,reasoning,content", CASES)
def test_stream_equals_extract_at_every_split(starts, text, reasoning, content):
    expected = ReasoningParser(starts).extract(text)
    for pieces in _splits(text, random.Random(text)):
        deltas = _stream(starts, pieces)
        assert all(isinstance(d, (ReasoningDelta, ContentDelta)) and d.text for d in deltas)
        assert assemble_reasoning(deltas) == expected, pieces


def test_partial_tags_are_held_back():
    parser = ReasoningParser()
    assert parser.feed("<thi") == []
    assert parser.feed("nk>\nStep one") == [ReasoningDelta("Step one")]
    assert parser.feed(".\n</thi") == [ReasoningDelta(".")]  # the newline waits: it may end the reasoning
    assert parser.feed("nk>\n\nDone") == [ContentDelta("Done")]
    assert parser.finish() == []
    assert ReasoningDelta("x").to_openai() == {"reasoning_content": "x"}


def test_reasoning_then_tool_calls():
    """A thinking model's tool call: content deltas of the reasoning parser feed a tool parser; any
    split gives the same reasoning, content and calls as the whole output."""
    text = ('<think>\nThe user wants the weather; call get_weather.\n</think>\n\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>')

    def run(pieces):
        reasoning_parser = ReasoningParser()
        tool_parser = get_tool_parser("hermes", id_factory=call_id_factory(seed=1))
        out = []
        for piece in [*pieces, None]:
            deltas = reasoning_parser.feed(piece) if piece is not None else reasoning_parser.finish()
            for d in deltas:
                out += tool_parser.feed(d.text) if isinstance(d, ContentDelta) else [d]
        return out + tool_parser.finish()

    for pieces in _splits(text, random.Random(0)):
        deltas = run(pieces)
        reasoning = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))
        content, calls = assemble(d for d in deltas if isinstance(d, (ContentDelta, ToolCallDelta)))
        assert reasoning == "The user wants the weather; call get_weather."
        assert content == ""
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Zürich"}')]


def test_names_prompts_and_detection():
    qwen3 = "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    r1 = "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}<think>\n"
    assert detect_reasoning_parser(qwen3) == detect_reasoning_parser(r1) == "qwen3"
    assert detect_reasoning_parser("{{ messages[0]['content'] }}") is None
    assert detect_reasoning_parser(None) is None
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
    assert get_reasoning_parser("deepseek_r1", prompt="<｜Assistant｜><think>\n").extract("a</think>b") == ("a", "b")
    assert get_reasoning_parser("qwen3", prompt="<|im_start|>assistant\n").extract("a</think>b") == ("", "a</think>b")
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("granite")
    parser = ReasoningParser()
    parser.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")
