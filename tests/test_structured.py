"""Structured outputs (xgrammar) on the real default model, on the CPU: JSON schemas, regex, choice,
EBNF; a mixed batch leaves the unconstrained requests untouched; bad specs are clean 400s."""

import json
import re

import pytest
import torch

from forge import LLM, SamplingParams, StructuredOutputsParams
from forge.errors import InvalidRequestError

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12},
                               "id": {"type": "integer", "minimum": 1, "maximum": 999}},
                "required": ["name", "id"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "size"],
    },
    "bounds": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10},
                       "count": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["score", "count"],
    },
    "required": {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 16},
                       "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                       "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["title", "year"],
    },
    "points": {
        "type": "array",
        "items": {"type": "object",
                  "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                 "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["x", "y"]},
        "minItems": 1,
        "maxItems": 2,
    },
}
TOPICS = ["a cat", "a city", "a book", "a planet", "a song", "a car", "a tree", "a robot", "a river", "a chef"]
EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=2048, num_kv_blocks=1024, max_num_seqs=64)


def chat(llm, text):
    tok = llm.llm_engine.tokenizer  # forge's own (get_tokenizer() is transformers-shaped)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
    return {"prompt_token_ids": ids, "prompt": None}


def constrained(max_tokens=48, temperature=0.0, seed=None, **spec):
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


def test_json_schemas_50_prompts_all_valid(llm):
    """50 prompts over six schemas (nested objects, arrays, enums, bounded numbers, optional
    fields, top-level arrays), sampled at temperature 0.8: every output parses and validates."""
    names = list(SCHEMAS)
    prompts, params, which = [], [], []
    for i in range(50):
        name = names[i % len(names)]
        prompts.append(chat(llm, f"Give JSON about {TOPICS[i % len(TOPICS)]} (#{i})."))
        # Half greedy, half seeded sampling; the dict and the JSON-text forms of a schema alike.
        schema = SCHEMAS[name] if i % 4 else json.dumps(SCHEMAS[name])
        params.append(constrained(max_tokens=64, temperature=0.8 if i % 2 else 0.0, seed=i, json=schema))
        which.append(name)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for name, out in zip(which, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (name, c.text)
        assert c.token_ids[-1] == EOS and "<|im_end|>" not in c.text
        jsonschema.validate(json.loads(c.text), SCHEMAS[name])
    # Compiled once per distinct schema (dict and JSON text share the cache entry).
    stats = llm.llm_engine.structured_backend.stats
    assert stats["compiled"] <= len(SCHEMAS) + 8  # other tests may have compiled a few of their own


def test_regex_choice_grammar_and_json_object(llm):
    prompts = [chat(llm, q) for q in ("What is your phone number?", "Name a product code.", "Say something.")]
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    code = r"[A-Z]{2,3}-\d{2,4}(-[a-z]{1,5})?"
    choices = ["yes", "no", 'maybe "so"', "naïve\\path"]
    params = (
        [constrained(temperature=0.9, seed=i, regex=phone) for i in range(3)]
        + [constrained(temperature=0.9, seed=10 + i, regex=code) for i in range(3)]
        + [constrained(temperature=0.9, seed=20 + i, choice=choices) for i in range(3)]
        + [constrained(grammar='root ::= "The answer is " [0-9] "."')] * 3
        + [constrained(max_tokens=96, json_object=True)] * 3
    )
    outs = llm.generate(prompts * 5, params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[:12]), texts
    assert all(re.fullmatch(phone, t) for t in texts[0:3]), texts[0:3]
    assert all(re.fullmatch(code, t) for t in texts[3:6]), texts[3:6]
    assert all(t in choices for t in texts[6:9]), texts[6:9]
    assert all(re.fullmatch(r"The answer is [0-9]\.", t) for t in texts[9:12]), texts[9:12]
    for o in outs[12:15]:  # any JSON object: valid when finished
        if o.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(o.outputs[0].text), dict)
        else:
            assert o.outputs[0].text.startswith("{")


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_mixed_batch_leaves_unconstrained_outputs_unchanged(llm, mode):
    prompts = [chat(llm, f"Tell me one fact about {t}.") for t in TOPICS[:6]]

    def plain(i):
        if mode == "greedy":
            return SamplingParams(temperature=0, max_tokens=20)
        return SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=20)

    alone = llm.generate(prompts, [plain(i) for i in range(len(prompts))], use_tqdm=False)
    mixed_prompts, mixed_params = [], []
    for i, p in enumerate(prompts):  # constrained and unconstrained interleaved in one batch
        mixed_prompts += [p, p]
        mixed_params += [plain(i), constrained(max_tokens=40, json=SCHEMAS["enum"])]
    mixed = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    for i, a in enumerate(alone):
        assert mixed[2 * i].outputs[0].token_ids == a.outputs[0].token_ids
        assert mixed[2 * i].outputs[0].text == a.outputs[0].text
        jsonschema.validate(json.loads(mixed[2 * i + 1].outputs[0].text), SCHEMAS["enum"])


def test_grammar_end_ends_request_even_with_ignore_eos(llm):
    p = chat(llm, "Is water wet?")
    out = llm.generate(p, constrained(max_tokens=30, choice=["yes", "no"]), use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop" and out.token_ids[-1] == EOS
    params = constrained(max_tokens=30, choice=["yes", "no"])
    params.ignore_eos = True
    out = llm.generate(p, params, use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop" and len(out.token_ids) < 30
    # n > 1: every sequence has its own matcher
    out = llm.generate(p, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=30,
                                         structured_outputs=StructuredOutputsParams(regex=r"[a-z]{1,6}!")),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 3 and all(re.fullmatch(r"[a-z]{1,6}!", o.text) for o in out.outputs)


@pytest.mark.parametrize(
    "spec, words",
    [
        (dict(json={"type": "foo"}), ["foo"]),
        (dict(json={"type": "integer", "minimum": 5, "maximum": 1}), ["minimum"]),
        (dict(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), ["missing"]),
        (dict(json={"type": "object", "required": "a"}), ["required"]),
        (dict(json='{"type": "object", '), ["not valid JSON"]),
        (dict(json="[1, 2]"), ["object"]),
        (dict(regex="(ab"), ["regex", "parenthesis"]),
        (dict(grammar="root ::= undefined_rule"), ["grammar", "undefined_rule"]),
        (dict(grammar='start ::= "a"'), ["grammar", "root"]),
    ],
)
def test_invalid_specs_are_clear_request_errors(llm, spec, words):
    engine = llm.llm_engine
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("Hello", constrained(**spec))
    assert err.value.param == "response_format"
    msg = str(err.value)
    assert "\n" not in msg and ".cc:" not in msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert not engine.has_unfinished_requests()


def test_invalid_spec_in_a_batch_leaves_engine_clean(llm):
    engine = llm.llm_engine
    good = constrained(json=SCHEMAS["enum"])
    bad = constrained(json={"type": "object", "properties": {"x": {"type": "nope"}}})
    with pytest.raises(InvalidRequestError, match="nope"):
        llm.generate(["a", "b", "c"], [good, good, bad], use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    out = llm.generate(chat(llm, "Pick a color and size."), good, use_tqdm=False)[0].outputs[0]
    jsonschema.validate(json.loads(out.text), SCHEMAS["enum"])


# -- the masking itself, without sampling ----------------------------------------------------------------


def _allowed(bitmask_row: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (bitmask_row.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(-1)[:vocab].bool()


class _Seq:  # the two attributes apply_masks reads
    def __init__(self, structured=None, request_id="r"):
        self.structured = structured
        self.request_id = request_id  # (a failing fill names it)


@pytest.mark.parametrize("overlap", [True, False])
def test_apply_masks_touches_only_constrained_rows(llm, overlap):
    from forge.structured import apply_masks, get_backend, make_matcher

    engine = llm.llm_engine
    backend = get_backend(engine)
    vocab = engine.model_config.vocab_size
    default, backend.overlap = backend.overlap, overlap
    try:
        spec = StructuredOutputsParams(json=SCHEMAS["nested"])
        m1, m2 = make_matcher(engine, spec), make_matcher(engine, spec)
        tok = engine.tokenizer
        for t in tok.encode('{"user": {"name": "Al'):
            assert m2.accept(t)
        seqs = [_Seq(), _Seq(m1), _Seq(), _Seq(m2)]
        logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
        ref = logits.clone()
        out = apply_masks(logits, seqs)
        assert out is logits
        assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])  # bit for bit
        start_ok = torch.isfinite(out[1])
        assert start_ok.sum() > 0 and not start_ok[EOS]
        assert all(tok.decode([t]).startswith("{") for t in start_ok.nonzero().flatten().tolist())
        inside = torch.isfinite(out[3])
        assert torch.equal(out[3][inside], ref[3][inside])
        assert torch.isneginf(out[3][~inside]).all()
        # Inside a JSON string: letters yes, special tokens (<|im_start|>, <repo_name>...) and EOS no.
        assert inside[tok.encode("ice")[0]] and not inside[1] and not inside[3] and not inside[EOS]
        # The step's mask equals a fresh fill by xgrammar itself.
        bm = torch.zeros(1, backend.bitmask_width, dtype=torch.int32)
        m2.xgr_matcher.fill_next_token_bitmask(bm, 0)
        assert torch.equal(_allowed(bm[0], vocab), inside)
    finally:
        backend.overlap = default


def test_matcher_terminates_on_eos_and_rolls_back(llm):
    from forge.structured import make_matcher

    engine = llm.llm_engine
    tok = engine.tokenizer
    m = make_matcher(engine, StructuredOutputsParams(choice=["yes", "no"]))
    for t in tok.encode("yes"):
        assert m.accept(t) and not m.is_terminated()
    assert m.is_completed()
    assert m.accept(EOS) and m.is_terminated()
    m.rollback(1)
    assert not m.is_terminated() and m.is_completed()
    # A token the grammar forbids ends the sequence instead of raising.
    m2 = make_matcher(engine, StructuredOutputsParams(choice=["yes", "no"]))
    assert not m2.accept(tok.encode("maybe")[0]) and m2.is_terminated()


def test_masks_along_drafts_that_end_in_the_stop_token(llm):
    """Speculative decoding's verify masks (Matcher.fill_masks_along): row j is the mask after the
    first j drafts; when the last draft is the stop token the row after it is never sampled from
    and gets allow-everything (the finished matcher has no mask to give: xgrammar raises), in
    whatever state the reused buffer was; the matcher is rolled back after."""
    import torch

    from forge.structured import make_matcher

    engine = llm.llm_engine
    m = make_matcher(engine, StructuredOutputsParams(choice=["yes", "no"]))
    drafts = engine.tokenizer.encode("yes") + [EOS]
    bitmask = torch.zeros(len(drafts) + 1, (engine.model_config.vocab_size + 31) // 32, dtype=torch.int32)
    m.fill_masks_along(drafts, bitmask, 0)
    allowed = lambda row, token: bool((bitmask[row, token // 32] >> (token % 32)) & 1)  # noqa: E731
    assert all(allowed(j, t) for j, t in enumerate(drafts))  # each draft under the mask before it
    assert torch.all(bitmask[len(drafts)] == -1)
    assert not m.is_terminated() and m.accept(drafts[0])  # rolled back to the start


def test_pushed_tokens_advance_the_grammar_before_the_next_mask(llm):
    """The engine's lazy `push` ends in the same state as `accept`; a stop token ends it at once."""
    from forge.structured import apply_masks, make_matcher

    engine = llm.llm_engine
    spec = StructuredOutputsParams(json=SCHEMAS["nested"])
    eager, lazy = make_matcher(engine, spec), make_matcher(engine, spec)
    tokens = engine.tokenizer.encode('{"user": {"name": "Al')
    for t in tokens:
        assert eager.accept(t)
        lazy.push(t)
    assert lazy.num_accepted == 0 and not lazy.is_terminated()
    logits = torch.zeros(2, engine.model_config.vocab_size)
    apply_masks(logits, [_Seq(eager), _Seq(lazy)])
    assert lazy.num_accepted == len(tokens)
    assert torch.isfinite(logits[0]).sum() > 0 and torch.equal(torch.isfinite(logits[0]), torch.isfinite(logits[1]))
    m = make_matcher(engine, StructuredOutputsParams(choice=["yes", "no"]))
    for t in engine.tokenizer.encode("no"):
        m.push(t)
    m.push(EOS)
    assert m.is_terminated()
    m.rollback(1)  # catches up first: the grammar took "no" + EOS
    assert not m.is_terminated() and m.is_completed()


def test_slow_fills_switch_to_the_thread_pool_with_the_same_masks(llm, monkeypatch):
    from forge.structured import apply_masks, get_backend, make_matcher
    from forge.structured import backend as backend_module

    engine = llm.llm_engine
    backend = get_backend(engine)
    vocab = engine.model_config.vocab_size
    spec = StructuredOutputsParams(json=SCHEMAS["nested"])
    matchers = [make_matcher(engine, spec) for _ in range(3)]
    for m, text in zip(matchers, ['{"user": {"name": "Al', '{"user": {"name": "Bo", "id": 4', '{"user": {"na']):
        for t in engine.tokenizer.encode(text):
            assert m.accept(t)
    seqs = [_Seq(m) for m in matchers]
    monkeypatch.setattr(backend_module, "_SLOW_FILL_S", 0.0)  # every one-thread fill counts as slow
    backend._parallel_fills_left = 0
    before = backend.stats["parallel_fills"]
    serial = apply_masks(torch.zeros(3, vocab), seqs)
    assert backend._parallel_fills_left == backend_module._PARALLEL_FILLS
    pooled = apply_masks(torch.zeros(3, vocab), seqs)
    assert backend.stats["parallel_fills"] == before + 1
    assert torch.equal(serial, pooled) and all(torch.isfinite(serial[i]).any() for i in range(3))
    backend._parallel_fills_left = 0


def test_wide_logits_are_masked_beyond_the_vocabulary(llm):
    from forge.structured import apply_masks, make_matcher

    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    m = make_matcher(engine, StructuredOutputsParams(regex="[0-9]+"))
    logits = torch.zeros(2, vocab + 64)
    apply_masks(logits, [_Seq(m), _Seq()])
    assert torch.isneginf(logits[0, vocab:]).all() and (logits[1] == 0).all()
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all(engine.tokenizer.decode([t]).isdigit() for t in allowed)


def test_compile_cache_is_per_spec(llm):
    from forge.structured import get_backend, make_matcher

    engine = llm.llm_engine
    backend = get_backend(engine)
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    before = backend.stats["compiled"]
    make_matcher(engine, StructuredOutputsParams(json=schema))
    make_matcher(engine, StructuredOutputsParams(json=json.dumps(schema, indent=2)))
    make_matcher(engine, StructuredOutputsParams(json=dict(schema)))
    assert backend.stats["compiled"] == before + 1
    make_matcher(engine, StructuredOutputsParams(regex="[0-9]+x"))
    assert backend.stats["compiled"] == before + 2


def test_torch_bitmask_apply_matches_xgrammar():
    """forge's bitmask apply (torch ops here; the CUDA kernel is tested against it) == xgrammar's
    own CPU kernel, on random masks over selected rows."""
    import xgrammar as xgr

    from forge.kernels.token_bitmask import apply_token_bitmask

    g = torch.Generator().manual_seed(7)
    vocab, batch, rows = 1000, 6, [4, 1, 5]
    words = xgr.get_bitmask_shape(1, vocab)[1]
    full = torch.randint(-(2**31), 2**31 - 1, (batch, words), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(batch, vocab, generator=g)
    ours, theirs = logits.clone(), logits.clone()
    apply_token_bitmask(ours, full[rows], torch.tensor(rows, dtype=torch.int32))
    xgr.apply_token_bitmask_inplace(theirs, full, vocab_size=vocab, indices=rows)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[[0, 2, 3]], logits[[0, 2, 3]])
