"""The offline API against vLLM's: its engine arguments accepted (honoured or warned about), dtype names,
logprobs=-1, a HF-compatible get_tokenizer(), chat() options and its rendered prompt, RequestOutput.metrics,
the seed of the engine, and error messages that name the limit that was hit."""

import dataclasses
import time
import warnings

import pytest

from forge import LLM, SamplingParams
from forge.errors import InvalidRequestError, PromptTooLongError
from forge.outputs import Logprob, RequestMetrics, VocabLogprobs

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def llm(tiny):
    """The tiny model with vLLM-style arguments, including ones that do not apply to forge."""
    import forge.llm

    forge.llm._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = LLM(tiny, dtype="float", max_model_len=256, num_kv_blocks=64, max_logprobs=-1, seed=7,
                  trust_remote_code=True, tokenizer=tiny, tokenizer_mode="auto", swap_space=4, revision="main",
                  enforce_eager=True, max_num_seqs=8, gpu_memory_utilization=0.5)
    llm.warnings = [str(w.message) for w in caught if str(w.message).startswith(("LLM(", "forge"))]
    return llm


def test_vllm_engine_arguments(llm, tiny):
    # honoured ones reach the engine
    config = llm.llm_engine.config
    assert (config.dtype, config.max_num_seqs, config.enforce_eager, config.max_logprobs, config.seed) == \
        ("float32", 8, True, -1, 7)
    assert config.gpu_memory_utilization == 0.5
    # the ones that do not apply warn once each, only when set to something other than vLLM's default
    assert llm.warnings == [
        "LLM(trust_remote_code=...) does not apply to forge and is ignored: forge runs no code from model repositories",
        "LLM(revision=...) does not apply to forge and is ignored: forge never downloads a model: pass a local path",
    ]
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        LLM(tiny, max_model_len=64, num_kv_blocks=8, trust_remote_code=True, revision="main", load_format="dummy")
    assert [w for w in again if str(w.message).startswith("LLM(")] == []  # once per process
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_seq'"):
        LLM(tiny, max_num_seq=4)  # a typo is still an error


@pytest.mark.parametrize("dtype, expected", [("half", "float16"), ("float16", "float16"), ("bfloat16", "bfloat16"),
                                             ("float", "float32"), ("float32", "float32"), ("auto", "auto")])
def test_dtype_names(dtype, expected):
    import torch

    from forge.config import EngineConfig

    assert EngineConfig(dtype=dtype).dtype == expected
    assert EngineConfig(dtype=getattr(torch, expected) if expected != "auto" else "auto").dtype == expected
    with pytest.raises(InvalidRequestError, match=r"dtype must be one of .* \(or half, float\), got 'int8'"):
        EngineConfig(dtype="int8")


def test_logprobs_of_the_whole_vocabulary(llm):
    vocab = llm.llm_engine.model_config.vocab_size
    prompt = {"prompt_token_ids": [504, 3575, 282, 4649, 314]}
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=-1, prompt_logprobs=-1)
    start = time.perf_counter()
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    full_seconds = time.perf_counter() - start
    start = time.perf_counter()
    top = llm.generate(prompt, dataclasses.replace(params, logprobs=5, prompt_logprobs=5), use_tqdm=False)[0]
    top_seconds = time.perf_counter() - start
    assert params.logprobs == -1  # the caller's params are left as given
    completion = out.outputs[0]
    assert completion.token_ids == top.outputs[0].token_ids
    for position, (entry, small) in enumerate(zip(completion.logprobs, top.outputs[0].logprobs)):
        assert isinstance(entry, VocabLogprobs) and len(entry) == vocab and len(set(entry)) == vocab
        token = completion.token_ids[position]
        assert entry[token] == small[token] and entry[token].rank == 1  # greedy: the chosen token ranks first
        ranked = list(entry.items())[:5]
        assert ranked == sorted(small.items(), key=lambda kv: kv[1].rank)[:5]
        values = [lp.logprob for lp in entry.values()]
        assert values == sorted(values, reverse=True)
        assert abs(sum(__import__("math").exp(v) for v in values) - 1) < 1e-3
    for entry, small, target in zip(out.prompt_logprobs[1:], top.prompt_logprobs[1:], prompt["prompt_token_ids"][1:]):
        assert len(entry) == vocab and entry[target].logprob == pytest.approx(small[target].logprob, abs=1e-5)
        assert entry[target].rank == small[target].rank  # the exact rank of the prompt token
    assert full_seconds < top_seconds + 2.0, (full_seconds, top_seconds)  # no per-token loop over the vocabulary


def test_max_logprobs_limits_requests(tiny):
    llm = LLM(tiny, max_model_len=64, num_kv_blocks=8)  # vLLM's default max_logprobs: 20
    for kwargs, message in [({"logprobs": -1}, r"logprobs=-1 \(the whole vocabulary, 49152 tokens\) is more than "
                                               r"max_logprobs=20; raise it with LLM\(max_logprobs=...\)"),
                            ({"logprobs": 21}, "logprobs=21 is more than max_logprobs=20"),
                            ({"prompt_logprobs": 50}, "prompt_logprobs=50 is more than max_logprobs=20")]:
        with pytest.raises(InvalidRequestError, match=message) as e:
            llm.generate("hi", SamplingParams(max_tokens=2, **kwargs), use_tqdm=False)
        assert e.value.param == next(iter(kwargs))
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate("hi", SamplingParams(max_tokens=2, logprobs=20), use_tqdm=False)[0]
    assert all(len(entry) >= 20 for entry in out.outputs[0].logprobs)
    with pytest.raises(InvalidRequestError, match="must be an integer >= -1, got -2"):
        SamplingParams(logprobs=-2)


def test_context_errors_name_the_limit(tiny):
    llm = LLM(tiny, num_kv_blocks=1)  # 16 tokens of KV cache for a model of 2048
    with pytest.raises(PromptTooLongError, match=r"exceeds the context: the KV cache holds 16 tokens \(1 block of 16; "
                                                 r"raise num_kv_blocks or the memory for the cache\)"):
        llm.generate("hi", SamplingParams(max_tokens=32), use_tqdm=False)
    llm = LLM(tiny, max_model_len=32, num_kv_blocks=8)
    with pytest.raises(PromptTooLongError, match=r"prompt has 40 tokens but max_model_len is 32 tokens"):
        llm.generate({"prompt_token_ids": [5] * 40}, SamplingParams(max_tokens=2), use_tqdm=False)


def test_get_tokenizer_is_hf_compatible(llm):
    """With transformers: a real PreTrainedTokenizerFast; without: forge's wrapper. Both answer alike."""
    from transformers import PreTrainedTokenizerFast

    from forge.hf_tokenizer import HFCompatibleTokenizer, hf_compatible_tokenizer

    hf = llm.get_tokenizer()
    assert isinstance(hf, PreTrainedTokenizerFast) and llm.get_tokenizer() is hf
    own = hf_compatible_tokenizer(llm.llm_engine.tokenizer, "tiny", use_transformers=False)
    assert isinstance(own, HFCompatibleTokenizer)
    text = "The capital of France is Paris. <|im_end|> 12345"
    for tok in (hf, own):
        assert len(tok) == 49152 and tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"
        assert tok(text).input_ids == hf(text)["input_ids"] == llm.llm_engine.tokenizer.encode(text, True)
        assert tok([text, "hi"])["input_ids"][1] == hf("hi")["input_ids"]
        assert tok.encode(text) == hf.encode(text) and tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == hf.decode(hf.encode(text),
                                                                                   skip_special_tokens=True)
        assert tok.convert_ids_to_tokens(tok.encode("hello world")) == ["hello", "Ġworld"]
        # apply_chat_template: ids by default (tokenize=True), text with tokenize=False, no generation prompt
        # unless asked, as transformers
        rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert rendered == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("<|im_start|>assistant\n")
        assert not tok.apply_chat_template(CHAT, tokenize=False).endswith("<|im_start|>assistant\n")
        ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
        assert ids == hf.encode(rendered, add_special_tokens=False) and tok.decode(ids) == rendered
        assert tok.apply_chat_template(CHAT, return_dict=True)["input_ids"] == \
            hf.apply_chat_template(CHAT, return_dict=True)["input_ids"]
    assert own.apply_chat_template(CHAT, add_generation_prompt=True) == ids  # the wrapper's default: ids
    with pytest.raises(TypeError, match="return_tensors need the transformers package"):
        own("hi", return_tensors="pt")


def test_chat_outputs_carry_the_rendered_prompt_and_take_template_options(llm):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    tok = llm.llm_engine.tokenizer
    out = llm.chat(CHAT, params, use_tqdm=False)[0]
    assert out.prompt == tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert out.prompt_token_ids == tok.encode(out.prompt) and len(out.outputs[0].token_ids) == 4
    # continue_final_message: the prompt ends inside the last (assistant) message
    partial = CHAT + [{"role": "assistant", "content": "My favourite color is"}]
    out = llm.chat(partial, params, add_generation_prompt=False, continue_final_message=True, use_tqdm=False)[0]
    assert out.prompt.endswith("<|im_start|>assistant\nMy favourite color is")
    # a template of one's own, with a variable of one's own
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{{ suffix }}"
    out = llm.chat(CHAT, params, chat_template=template, chat_template_kwargs={"suffix": "ANSWER:"}, use_tqdm=False)[0]
    assert out.prompt == "[system] Be brief.\n[user] Name a color.\nANSWER:"
    # two conversations at once; and without a generation prompt the text ends after the user's turn
    outs = llm.chat([CHAT, CHAT[1:]], params, add_generation_prompt=False, use_tqdm=False)
    assert [o.prompt.endswith("Name a color.<|im_end|>\n") for o in outs] == [True, True]
    with pytest.raises(InvalidRequestError, match="LoRA"):
        llm.chat(CHAT, params, lora_request=object(), use_tqdm=False)


def test_request_metrics(llm):
    before = time.time()
    out = llm.generate(["one", "two"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[1]
    after = time.time()
    m = out.metrics
    assert isinstance(m, RequestMetrics)
    assert before <= m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= after
    assert m.finished_time == m.last_token_time
    assert m.time_in_queue == pytest.approx(m.first_scheduled_time - m.arrival_time) and m.time_in_queue >= 0


def test_engine_seed_makes_unseeded_sampling_repeat(tiny):
    """As vLLM's engine seed: the same script gives the same samples run to run, a different seed others."""
    params = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)

    def texts(seed: int) -> list[list[int]]:
        llm = LLM(tiny, max_model_len=64, num_kv_blocks=16, seed=seed)
        return [o.outputs[0].token_ids for o in llm.generate(["a", "a"], params, use_tqdm=False)]

    first = texts(7)
    assert first[0] != first[1]  # each request draws its own seed
    assert texts(7) == first and texts(8) != first
    assert params.seed is None  # the caller's params are left as given


def test_vocab_logprobs_reads_like_a_dict():
    entry = VocabLogprobs([(5, -0.1), (9, -2.5), (1, -3.0)], decode=lambda t: f"<{t}>")
    assert list(entry) == [5, 9, 1] and len(entry) == 3 and 9 in entry and 4 not in entry
    assert entry[1] == Logprob(-3.0, 3, "<1>") and entry.get(4) is None
    assert dict(entry) == {5: Logprob(-0.1, 1, "<5>"), 9: Logprob(-2.5, 2, "<9>"), 1: Logprob(-3.0, 3, "<1>")}


def test_a_hub_id_gets_a_hint(tmp_path, monkeypatch):
    from forge.errors import ModelLoadError
    from forge.loader import load_model

    monkeypatch.chdir(tmp_path)  # (nothing named HuggingFaceTB/ here)
    with pytest.raises(ModelLoadError, match=r"model not found: HuggingFaceTB/SmolLM2-135M-Instruct \('HuggingFaceTB/"
                                             r"SmolLM2-135M-Instruct' looks like a model-hub id, but forge never "
                                             r"downloads models: fetch it first, e.g. `huggingface-cli download"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    for path in ("missing.gguf", "./org/name", str(tmp_path / "a" / "b")):  # plain paths: no hint
        with pytest.raises(ModelLoadError) as e:
            load_model(path)
        assert "hub id" not in str(e.value)
