"""Structured outputs on the CUDA path (masks applied on the GPU by xgrammar's kernel): the same
masks as the CPU path, valid outputs, unconstrained rows of a mixed batch untouched."""

import json
import re

import pytest
import torch

from forge import LLM, SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.cuda

ENUM_SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["color", "n"],
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from forge.loader.safetensors import save_hf_dir
    from tests.util import default_tokenizer, random_weights, tiny_config

    tok = default_tokenizer()
    config = tiny_config(vocab_size=tok.vocab_size)
    path = tmp_path_factory.mktemp("structured-cuda")
    save_hf_dir(path, config, random_weights(config, seed=1, scale=0.02), tok)
    return LLM(str(path), device="cuda", max_model_len=1024, max_num_seqs=32)


class _Seq:
    def __init__(self, structured=None, request_id: str = "r"):
        self.structured = structured
        self.request_id = request_id  # mask failures name their request


def test_cuda_masks_equal_cpu_masks(llm):
    from forge.structured import apply_masks, make_matcher

    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    spec = StructuredOutputsParams(json=ENUM_SCHEMA)
    m = make_matcher(engine, spec)
    for t in engine.tokenizer.encode('{"color": "'):
        assert m.accept(t)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    ref = logits.clone()
    seqs = [_Seq(), _Seq(m), _Seq()]
    cpu = apply_masks(logits.clone(), seqs)
    gpu = apply_masks(logits.cuda(), seqs).cpu()
    assert torch.equal(torch.isfinite(cpu), torch.isfinite(gpu))
    assert torch.equal(gpu[0], ref[0]) and torch.equal(gpu[2], ref[2])
    allowed = torch.isfinite(gpu[1]).nonzero().flatten().tolist()
    words = ['red"', 'green"', 'blue"']
    for t in allowed:
        text = engine.tokenizer.decode([t])
        assert any(w.startswith(text) or text.startswith(w) for w in words), text


def test_cuda_constrained_outputs_valid_and_unconstrained_untouched(llm):
    jsonschema = pytest.importorskip("jsonschema")
    prompts = [f"Request number {i}:" for i in range(8)]
    plain = SamplingParams(temperature=0, max_tokens=16)
    alone = llm.generate(prompts, plain, use_tqdm=False)
    specs = [StructuredOutputsParams(json=ENUM_SCHEMA), StructuredOutputsParams(choice=["alpha", "beta"]),
             StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")]
    mixed_prompts, mixed_params = [], []
    for i, p in enumerate(prompts):
        mixed_prompts += [p, p]
        mixed_params += [plain, SamplingParams(temperature=0.8, seed=i, max_tokens=48,
                                               structured_outputs=specs[i % len(specs)])]
    mixed = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    for i, a in enumerate(alone):
        assert mixed[2 * i].outputs[0].token_ids == a.outputs[0].token_ids
        c = mixed[2 * i + 1].outputs[0]
        assert c.finish_reason == "stop", c.text
        kind = i % len(specs)
        if kind == 0:
            jsonschema.validate(json.loads(c.text), ENUM_SCHEMA)
        elif kind == 1:
            assert c.text in ("alpha", "beta")
        else:
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text)
