"""Output processing without a model: the stop checks (one pure function, every condition and their
order), logprob entries (sampled and prompt tokens built the same way), and add_token's stop strings
split across tokens."""

import pytest
import torch

from forge import SamplingParams
from forge.engine.output_processor import OutputProcessor, Stop, check_stop
from forge.engine.sampler import SampleResult
from forge.outputs import VocabLogprobs
from forge.sequence import Sequence
from forge.tokenizer import IncrementalDetokenizer
from tests.util import default_tokenizer

EOS = 2
MAX_LEN = 64


class Grammar:  # what check_stop reads of a matcher
    def __init__(self, terminated: bool):
        self.terminated = terminated

    def is_terminated(self) -> bool:
        return self.terminated


def seq_with(outputs: list[int], prompt_len: int = 4, grammar=None, **params) -> Sequence:
    seq = Sequence("r", list(range(10, 10 + prompt_len)), SamplingParams(temperature=0, **params))
    seq.token_ids += outputs
    seq.structured = grammar
    return seq


@pytest.mark.parametrize("outputs, params, kw, expected", [
    ([5, 6], {}, {}, None),
    ([5, 7], dict(stop_token_ids=[7]), {}, Stop("stop", 7)),
    ([7], dict(stop_token_ids=[7], min_tokens=2), {}, None),  # min_tokens holds stop ids back
    ([5, EOS], {}, {}, Stop("stop", EOS)),
    ([5, EOS], dict(ignore_eos=True), {}, None),
    ([EOS], dict(min_tokens=2), {}, None),
    ([5], {}, dict(grammar=Grammar(True)), Stop("stop")),
    ([5], {}, dict(grammar=Grammar(False)), None),
    ([5, 6, 7], dict(max_tokens=3), {}, Stop("length")),
    ([5, 6], dict(max_tokens=3), {}, None),
    ([5] * 4, {}, dict(prompt_len=MAX_LEN - 4), Stop("length")),  # the context is full
    ([5, 6, 7], dict(max_tokens=3, stop_token_ids=[7]), {}, Stop("stop", 7)),  # a stop token wins over length
    ([5, EOS], dict(max_tokens=2), dict(grammar=Grammar(True)), Stop("stop", EOS)),
], ids=["none", "stop-id", "stop-id-min", "eos", "eos-ignored", "eos-min", "grammar-end", "grammar-open",
        "max-tokens", "below-max", "context", "stop-before-length", "eos-before-grammar"])
def test_check_stop_token_conditions(outputs, params, kw, expected):
    seq = seq_with(outputs, **params, **kw)
    before = (list(seq.token_ids), seq.status, seq.finish_reason)
    assert check_stop(seq, MAX_LEN, {EOS}) == expected
    assert (seq.token_ids, seq.status, seq.finish_reason) == before  # pure: it only reads


@pytest.mark.parametrize("text, searched, params, expected", [
    ("one, two, 9", 9, dict(stop=["9"]), Stop("stop", "9", 10)),
    ("one, two, 9", 9, dict(stop=["9"], include_stop_str_in_output=True), Stop("stop", "9", 11)),
    ("say END", 5, dict(stop=["END"]), Stop("stop", "END", 4)),  # begun in the old text, ended in the new
    ("END and more", 12, dict(stop=["END"]), None),  # searched already: older text is not searched again
    ("a b", 2, dict(stop=["x", "b"]), Stop("stop", "b", 2)),
    ("a b", 2, dict(stop=["b"], min_tokens=5), None),
    ("a b", 2, dict(stop=["b"], max_tokens=2), Stop("stop", "b", 2)),  # a stop string wins over length
])
def test_check_stop_strings(text, searched, params, expected):
    seq = seq_with([5, 6], **params)
    assert check_stop(seq, MAX_LEN, {EOS}, text, searched) == expected


@pytest.fixture(scope="module")
def processor():
    tok = default_tokenizer()
    return OutputProcessor(tok, 64, MAX_LEN, {EOS})


def test_logprob_entries_one_shape(processor):
    """A sampled token and a prompt token with the same logprobs give the same entry."""
    logprobs = torch.log_softmax(torch.randn(1, 64, generator=torch.Generator().manual_seed(1)), -1)
    top = torch.topk(logprobs, 3)
    pairs = list(zip(top.indices[0].tolist(), top.values[0].tolist()))
    token = pairs[1][0]  # the second most likely
    sampled = processor.logprob_entry(token, pairs[1][1], 2, pairs, 3)
    [prompt] = processor._prompt_entries(logprobs, [token], 3)
    assert list(sampled) == list(prompt) == [token, pairs[0][0], pairs[2][0]]  # the token first, then the top
    assert {t: (e.logprob, e.rank, e.decoded_token) for t, e in sampled.items()} == \
        {t: (pytest.approx(e.logprob), e.rank, e.decoded_token) for t, e in prompt.items()}
    below = next(t for t in range(64) if t not in dict(pairs))
    outside = processor.logprob_entry(below, -9.0, -1, pairs, 3)  # a sampled token below the top-n: rank unknown
    assert outside[below].rank == -1 and len(outside) == 4
    whole = processor.logprob_entry(token, 0.0, 0, pairs, 64)  # the whole vocabulary: made when read
    assert isinstance(whole, VocabLogprobs) and whole[pairs[0][0]].rank == 1


def test_add_token_finds_a_stop_string_split_across_tokens(processor):
    tok = processor.tokenizer
    ids = tok.encode("The answer is 42. Done")
    params = SamplingParams(temperature=0, stop=["42. D"], logprobs=0)
    seq = Sequence("r", [1], params, detokenizer=IncrementalDetokenizer(tok, [1]))
    stops = [processor.add_token(seq, SampleResult(t, logprob=-0.5, top_logprobs=[]), now=1.0) for t in ids]
    first = next(i for i, s in enumerate(stops) if s is not None)
    assert stops[first] == Stop("stop", "42. D", len("The answer is ")) and first == len(stops) - 1
    assert tok.decode(ids[: first + 1]).endswith("Done")  # found after the token that completed it
    assert [list(e) for e in seq.output_logprobs] == [[t] for t in ids]  # rank unknown: top_logprobs were not asked
    assert seq.cumulative_logprob == pytest.approx(-0.5 * len(ids)) and seq.first_token_time == 1.0


def test_add_token_hands_the_token_to_the_grammar(processor):
    class Matcher(Grammar):
        def push(self, token):
            self.pushed = token
            self.terminated = token == EOS

    seq = seq_with([], grammar=Matcher(False))
    seq.detokenizer = IncrementalDetokenizer(processor.tokenizer, seq.token_ids)
    assert processor.add_token(seq, SampleResult(EOS), 0.0) == Stop("stop", EOS)
    assert seq.structured.pushed == EOS and seq.output_token_ids == [EOS]
