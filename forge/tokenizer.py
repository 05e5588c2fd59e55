"""Tokenizer: text <-> token ids, chat templates and streaming detokenization.

Everything is built on the HF `tokenizers` library. A GGUF file carries its vocabulary as plain
metadata (tokens, merges, scores, token types), so `Tokenizer.from_gguf_metadata` assembles an
equivalent `tokenizers.Tokenizer` from it, choosing the pre-tokenizer the same way llama.cpp does
(from `tokenizer.ggml.pre`). An HF model directory already has a `tokenizer.json` and is loaded
directly. `save_hf_dir` writes the HF form, so a GGUF tokenizer can be round-tripped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from forge.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError

__all__ = ["Tokenizer", "IncrementalDetokenizer"]

# GGUF token types (gguf.TokenType / llama.cpp's llama_token_type).
_TOKEN_NORMAL = 1
_TOKEN_UNKNOWN = 2
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
_TOKEN_BYTE = 6

# Tokens that end an assistant turn in the chat formats of Llama-family models. A chat model may
# emit one of these instead of (or before) its configured EOS, so generation must stop on them too.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>",
                       "<end_of_turn>",  # Gemma
                       "<|end|>")  # Phi-3

# The Llama-3 pre-tokenizer split (same regex as llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3 and the
# `Split` step of Meta's tokenizer.json).
_LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2's split: Llama 3's with single digits (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2, Qwen's tokenizer.json).
_QWEN2_SPLIT_REGEX = _LLAMA3_SPLIT_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

_SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible stand-in for a space


# ---------------------------------------------------------------------------------------------
# Building a `tokenizers.Tokenizer` from GGUF metadata
# ---------------------------------------------------------------------------------------------


def _gpt2_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The byte-level pre-tokenizer for a GGUF `tokenizer.ggml.pre` name, plus BPE ignore_merges."""
    if pre in ("smollm", "starcoder", "refact"):
        # llama.cpp gives these one regex set: every digit on its own, then the GPT-2 split.
        # SmolLM2's tokenizer.json spells the same thing as Digits + ByteLevel(use_regex).
        return (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            ),
            False,
        )
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        # Llama 3 looks whole pre-tokens up in the vocab before merging (ignore_merges), as both
        # its tokenizer.json and llama.cpp do; without it a few rare words tokenize differently.
        return (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            ),
            True,
        )
    if pre == "qwen2":  # (Qwen2/2.5/3)
        return (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            ),
            False,
        )
    if pre in ("default", "gpt2", "gpt-2", ""):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    raise UnsupportedModelError(f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre)")


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging.

    llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring vocab piece. A BPE model reproduces that when every split (left, right) of
    a piece is a merge ranked by the piece's score, best first (the same construction as
    transformers' SentencePieceExtractor).
    """
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    candidates: list[tuple[float, int, int, int, str, str]] = []
    for piece_id, piece in enumerate(tokens):
        if types[piece_id] not in (_TOKEN_NORMAL, _TOKEN_USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            left_id, right_id = vocab.get(left), vocab.get(right)
            if left_id is not None and right_id is not None:
                candidates.append((-scores[piece_id], piece_id, left_id, right_id, left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _build_from_gguf(fields: Mapping[str, Any]) -> tuple[HFTokenizer, bool]:
    """The HF tokenizer for GGUF tokenizer metadata, and the model's default for adding BOS."""
    ggml_model = fields.get("tokenizer.ggml.model")
    if ggml_model not in ("gpt2", "llama"):
        raise UnsupportedModelError(f"unsupported GGUF tokenizer model {ggml_model!r} (tokenizer.ggml.model)")
    tokens: list[str] | None = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    tokens = list(tokens)
    types = list(fields.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    add_bos_key = fields.get("tokenizer.ggml.add_bos_token")

    if ggml_model == "gpt2":
        pre = fields.get("tokenizer.ggml.pre") or "default"
        pre_tokenizer, ignore_merges = _gpt2_pre_tokenizer(pre)
        vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
        # Byte-level tokens never contain a real space (it is mapped to "Ġ"), so one split is safe.
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
        tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.ByteLevel()
        # llama.cpp adds BOS by default only for the Llama-3 family among BPE vocabularies.
        default_add_bos = ignore_merges
    else:  # "llama": SentencePiece-style vocabulary with scores
        scores = list(fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
        unk_id = fields.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
        has_byte_tokens = "<0x00>" in vocab
        tok = HFTokenizer(
            models.BPE(
                vocab,
                _spm_merges(tokens, scores, types),
                unk_token=unk,
                fuse_unk=True,
                byte_fallback=has_byte_tokens,  # characters outside the vocab become <0xNN> bytes
            )
        )
        add_space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        # A normalizer runs on each stretch of text between special tokens, so like llama.cpp
        # every stretch gets the "▁" prefix (Metaspace would skip text already starting with one).
        steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", _SPM_SPACE)]
        if add_space_prefix:
            steps.insert(0, normalizers.Prepend(_SPM_SPACE))
        tok.normalizer = normalizers.Sequence(steps)
        dec: list[decoders.Decoder] = [decoders.Replace(_SPM_SPACE, " ")]
        if has_byte_tokens:
            dec.append(decoders.ByteFallback())
        dec.append(decoders.Fuse())
        if add_space_prefix:
            dec.append(decoders.Strip(content=" ", left=1, right=0))  # undo the added prefix
        tok.decoder = decoders.Sequence(dec)
        default_add_bos = True  # SentencePiece Llama models (Llama 1/2, Mistral) expect <s>

    # Control/unknown tokens are special: matched whole in text and dropped by skip_special_tokens.
    # User-defined tokens are matched whole too, but are ordinary text when decoding (llama.cpp
    # always renders them), so they are not marked special.
    added = []
    for text, ttype in zip(tokens, types):
        if ttype in (_TOKEN_CONTROL, _TOKEN_UNKNOWN, _TOKEN_USER_DEFINED) and text:
            special = ttype != _TOKEN_USER_DEFINED
            added.append(AddedToken(text, special=special, normalized=False))
    if added:
        tok.add_tokens(added)
    add_bos = default_add_bos if add_bos_key is None else bool(add_bos_key)
    return tok, add_bos


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in some HF
    templates; for inference the body is rendered as-is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot format (e.g. a system message in
    # the wrong place); that is the request's fault, so it surfaces as an InvalidRequestError.
    raise InvalidRequestError(f"chat template rejected the conversation: {message}", param="messages")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<', '>' and '&'; HF's does not, and templates rely on that.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_jinja_env() -> ImmutableSandboxedEnvironment:
    # Same settings as transformers' apply_chat_template, so templates render byte-identically.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    """A compiled chat template (the model's own, named ones and overrides share this cache)."""
    return _make_jinja_env().from_string(source)


# transformers' marker for the end of the message to continue (continue_final_message).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names a message may carry its reasoning under, in the order transformers prefers them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates expect them, in new dicts (the caller's are not changed).

    * A tool call's `function.arguments` in the OpenAI shape is JSON text; templates (Llama 3.x,
      Mistral, Hermes) write it with `| tojson` and expect an object, as transformers documents,
      so text that parses to an object is replaced by the object (as vLLM does).
    * Reasoning given as `reasoning_content`, `thinking` or `reasoning` is offered under the first
      two names too, as transformers does (Qwen3 templates read reasoning_content, gpt-oss thinking).
    """
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise InvalidRequestError(f"each message must be an object, got {type(message).__name__}", param="messages")
        message = dict(message)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message["tool_calls"] = [_template_tool_call(c) for c in calls]
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _template_tool_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return call  # not JSON: left as the client sent it
    if not isinstance(parsed, dict):
        return call
    return {**call, "function": {**function, "arguments": parsed}}


def _mark_final_message(messages: list[dict[str, Any]]) -> None:
    """Append the continue tag to the final message's text (its last text part for a list)."""
    if not messages:
        raise InvalidRequestError("continue_final_message needs at least one message", param="messages")
    final = messages[-1]
    content = final.get("content")
    if isinstance(content, str):
        final["content"] = content + _CONTINUE_TAG
        return
    if isinstance(content, list):
        for i in range(len(content) - 1, -1, -1):
            part = content[i]
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                final["content"] = content[:i] + [{**part, "text": part["text"] + _CONTINUE_TAG}] + content[i + 1:]
                return
    raise InvalidRequestError("continue_final_message needs a final message with text content", param="messages")


def _cut_after_final_message(rendered: str) -> str:
    """The rendered chat up to the end of the final message's text (transformers' rule)."""
    loc = rendered.rfind(_CONTINUE_TAG.strip())
    if loc < 0:
        raise InvalidRequestError("continue_final_message: the chat template does not write the final message's "
                                  "text, so it cannot be continued", param="messages")
    if rendered[loc: loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:loc]
    return rendered[:loc].rstrip()  # the template trimmed the message's trailing whitespace


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or a dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _post_processor_adds_bos(tokenizer_json: dict[str, Any], bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor prepends BOS (how Llama-3 repos say add_bos)."""
    proc = tokenizer_json.get("post_processor") or {}
    procs = proc.get("processors", []) if proc.get("type") == "Sequence" else [proc]
    for p in procs:
        if p and p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            if "SpecialToken" in first and first["SpecialToken"].get("id") == bos:
                return True
    return False


class Tokenizer:
    """Encodes and decodes text for one model and renders its chat template.

    Build it with `from_gguf_metadata` or `from_hf_dir`. `encode` never adds special tokens unless
    asked, and special-token text in the input (e.g. "<|im_start|>") maps to its single id, so a
    rendered chat template encodes exactly as the model was trained.
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        extra_stop_token_ids: Iterable[int] = (),
        named_chat_templates: Mapping[str, str] | None = None,
    ):
        self._tok = tokenizer
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self._add_bos_token = add_bos_token
        self._chat_template = chat_template
        self._extra_stop_token_ids = frozenset(extra_stop_token_ids)
        # Extra templates by name (e.g. "tool_use", used when tools are given, as transformers does).
        self._named_chat_templates = dict(named_chat_templates or {})

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata given as {key: python value} (lists for array fields)."""
        tok, add_bos = _build_from_gguf(fields)
        n = len(fields["tokenizer.ggml.tokens"])

        def token_id(key: str) -> int | None:
            value = fields.get(key)
            return int(value) if value is not None and 0 <= int(value) < n else None

        extra = [token_id(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
        return cls(
            tok,
            bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
            eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
            add_bos_token=add_bos,
            chat_template=fields.get("tokenizer.chat_template") or None,
            extra_stop_token_ids=[i for i in extra if i is not None],
            # llama.cpp's converter stores a repo's named templates as tokenizer.chat_template.<name>.
            named_chat_templates={k.removeprefix("tokenizer.chat_template."): v for k, v in fields.items()
                                  if k.startswith("tokenizer.chat_template.") and isinstance(v, str) and v},
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json plus tokenizer_config.json (and generation_config/config.json EOS ids)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"no tokenizer.json in {path}")
        try:
            tok = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises plain Exception for malformed files
            raise ModelLoadError(f"cannot load {tokenizer_file}: {e}") from e
        tok_config = _read_json(path / "tokenizer_config.json")
        gen_config = _read_json(path / "generation_config.json")
        model_config = _read_json(path / "config.json")

        chat_template = tok_config.get("chat_template")
        named: dict[str, str] = {}
        if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in chat_template
                     if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
            chat_template = named.pop("default", None)
        if not chat_template and (path / "chat_template.jinja").is_file():
            chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if not chat_template:
            chat_template = _read_json(path / "chat_template.json").get("chat_template")

        def special_id(name: str, config_key: str) -> int | None:
            content = _token_content(tok_config.get(name))
            if content is not None and tok.token_to_id(content) is not None:
                return tok.token_to_id(content)
            ids = _as_id_list(gen_config.get(config_key)) or _as_id_list(model_config.get(config_key))
            return ids[0] if ids else None

        bos_id = special_id("bos_token", "bos_token_id")
        eos_id = special_id("eos_token", "eos_token_id")
        # generation_config may list several EOS ids (Llama 3.1: end_of_text, eom_id, eot_id).
        extra = _as_id_list(gen_config.get("eos_token_id")) + _as_id_list(model_config.get("eos_token_id"))

        add_bos = tok_config.get("add_bos_token")
        if add_bos is None:
            bos = tok.id_to_token(bos_id) if bos_id is not None else None
            add_bos = _post_processor_adds_bos(json.loads(tok.to_str()), bos)
        return cls(
            tok,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            add_bos_token=bool(add_bos),
            chat_template=chat_template or None,
            extra_stop_token_ids=extra,
            named_chat_templates=named,
        )

    def save_hf_dir(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable by `from_hf_dir` (and transformers)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self._add_bos_token,
            "add_eos_token": False,
            "bos_token": self.id_to_token(self._bos_token_id) if self._bos_token_id is not None else None,
            "eos_token": self.id_to_token(self._eos_token_id) if self._eos_token_id is not None else None,
            "clean_up_tokenization_spaces": False,
        }
        if self._named_chat_templates:
            named = {"default": self._chat_template, **self._named_chat_templates}
            config["chat_template"] = [{"name": k, "template": v} for k, v in named.items() if v is not None]
        elif self._chat_template is not None:
            config["chat_template"] = self._chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (path / "tokenizer_config.json").write_text(text, encoding="utf-8")

    # --- properties ---------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> HFTokenizer:
        """The `tokenizers.Tokenizer` doing the work (transformers' name for it), for libraries that
        read a vocabulary (xgrammar: forge.structured)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def named_chat_templates(self) -> dict[str, str]:
        """Templates besides the default, by name (e.g. "tool_use")."""
        return dict(self._named_chat_templates)

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS, configured extra EOS ids and, for chat models, end-of-turn tokens."""
        stops = set(self._extra_stop_token_ids)
        if self._eos_token_id is not None:
            stops.add(self._eos_token_id)
        if self._chat_template is not None:
            for text in _END_OF_TURN_TOKENS:
                tok_id = self._tok.token_to_id(text)
                if tok_id is not None:
                    stops.add(tok_id)
        return frozenset(stops)

    # --- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`. With add_special_tokens, BOS is prepended if the model wants it."""
        # The wrapped tokenizer's own post-processor is never used: BOS is decided here from the
        # model's add_bos_token, so GGUF and HF sources behave the same.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos_token and self._bos_token_id is not None:
            if not ids or ids[0] != self._bos_token_id:  # a rendered template may already start with it
                ids.insert(0, self._bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # --- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **chat_template_kwargs: Any,
    ) -> str:
        """Render `messages` with the chat template into prompt text, as transformers would.

        tools: OpenAI tool dicts, given to the template as `tools` (None when absent, as
            transformers does); a model's "tool_use" template, if it has one, is used when given.
        add_generation_prompt: end with the assistant turn's opening.
        continue_final_message: end right after the final message's text, its turn left open, so
            the model continues it (cannot be combined with add_generation_prompt).
        chat_template: a template to use instead of the model's (or the name of one of its named
            templates).
        chat_template_kwargs: more template variables (enable_thinking, documents, ...).

        Messages reach the template as given (assistant `tool_calls`, `role: "tool"` messages and
        all), except that JSON-text tool-call arguments become objects and reasoning fields are
        aliased (see `_template_messages`).
        """
        source, overridden = self._select_template(chat_template, tools)
        try:
            template = _compile_template(source)
        except jinja2.TemplateError as e:
            if overridden:
                raise InvalidRequestError(f"the chat template does not compile: {e}", param="chat_template") from e
            raise UnsupportedModelError(f"the model's chat template does not compile: {e}") from e
        if continue_final_message and add_generation_prompt:
            raise InvalidRequestError("continue_final_message and add_generation_prompt cannot both be true "
                                      "(the first continues the last message, the second starts a new one)",
                                      param="continue_final_message")
        messages = _template_messages(messages)
        if continue_final_message:
            _mark_final_message(messages)
        variables: dict[str, Any] = {
            "bos_token": self.id_to_token(self._bos_token_id) if self._bos_token_id is not None else "",
            "eos_token": self.id_to_token(self._eos_token_id) if self._eos_token_id is not None else "",
            "documents": None,
            **chat_template_kwargs,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            rendered = template.render(**variables)
        except jinja2.TemplateError as e:
            # Undefined fields, bad types in messages and the like: the request does not fit the template.
            raise InvalidRequestError(f"cannot render chat template: {e}", param="messages") from e
        return _cut_after_final_message(rendered) if continue_final_message else rendered

    def _select_template(self, chat_template: str | None, tools: Any) -> tuple[str, bool]:
        """(template source, whether it is an override rather than the model's own)."""
        if chat_template is not None:
            if chat_template in self._named_chat_templates:
                return self._named_chat_templates[chat_template], False
            return chat_template, True
        if tools is not None and "tool_use" in self._named_chat_templates:
            return self._named_chat_templates["tool_use"], False
        if self._chat_template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead", param="messages")
        return self._chat_template, False


# ---------------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns generated token ids into text one token at a time, for streaming.

    Decoding tokens one by one is wrong twice over: a UTF-8 character can span several byte-level
    tokens, and SentencePiece decoders treat a leading space differently at the start of a string.
    So, as in vLLM, a short window of tokens is decoded: ids[prefix_offset:read_offset] is text
    already emitted, ids[prefix_offset:] is that plus the new tokens, and the difference is emitted
    only once it no longer ends in U+FFFD (an unfinished multi-byte character).
    """

    # Prompt tokens kept in the first window, so the first output token is decoded in context.
    _INITIAL_WINDOW = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids)
        self._num_prompt_ids = len(self._ids)
        self._prefix_offset = max(len(self._ids) - self._INITIAL_WINDOW, 0)
        self._read_offset = len(self._ids)
        self._text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing visible yet, or a character still waits for its remaining bytes
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        return delta

    def catch_up(self, output_ids: list[int]) -> None:
        """Add every id of `output_ids` (all generated ids so far) not added yet."""
        for token_id in output_ids[len(self._ids) - self._num_prompt_ids :]:
            self.add(token_id)

    def flush(self) -> str:
        """Emit whatever is still held back (e.g. an incomplete character at the end of generation)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._text += delta
        return delta

    @property
    def text(self) -> str:
        """All output text emitted so far (prompt excluded)."""
        return self._text

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_prompt_ids :]
