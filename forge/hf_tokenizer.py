"""`LLM.get_tokenizer()`: the model's tokenizer with the interface of a HF transformers tokenizer, which
is what code written for vLLM expects (`tok(text).input_ids`, `len(tok)`, `tok.apply_chat_template(...)`
returning token ids, `tok.eos_token_id`, ...).

With transformers installed it is a real `transformers.PreTrainedTokenizerFast`, loaded from the same
tokenizer.json and settings forge uses (written by `Tokenizer.save_hf_dir`), so anything HF code does
with a tokenizer works. transformers is not a forge dependency: without it, `HFCompatibleTokenizer`
offers the commonly used part of that interface with HF's defaults (special tokens added when
encoding and kept when decoding; `apply_chat_template` tokenizes, and adds no generation prompt
unless asked).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from typing import Any

from forge.tokenizer import Tokenizer


def hf_compatible_tokenizer(tokenizer: Tokenizer, name_or_path: str = "", use_transformers: bool = True):
    """A transformers PreTrainedTokenizerFast when transformers is installed (and use_transformers),
    else an HFCompatibleTokenizer."""
    if use_transformers:
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            pass
        else:
            with tempfile.TemporaryDirectory(prefix="forge-tokenizer-") as folder:
                tokenizer.save_hf_dir(folder)
                hf = PreTrainedTokenizerFast.from_pretrained(folder)
            hf.name_or_path = name_or_path
            return hf
    return HFCompatibleTokenizer(tokenizer, name_or_path)


class BatchEncoding(dict):
    """HF's BatchEncoding, in brief: a dict whose keys also read as attributes (`enc.input_ids`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class HFCompatibleTokenizer:
    """The HF tokenizer interface over a forge Tokenizer, for when transformers is not installed."""

    is_fast = True
    padding_side = "right"

    def __init__(self, tokenizer: Tokenizer, name_or_path: str = ""):
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path

    # -- vocabulary and special tokens ---------------------------------------------------------
    def __len__(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {self.tokenizer.id_to_token(i): i for i in range(len(self))}

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self.eos_token_id)

    pad_token_id = None
    pad_token = None

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in (self.bos_token_id, self.eos_token_id) if i is not None]

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    # -- text <-> ids ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **kwargs: Any) -> BatchEncoding:
        unsupported = {k: v for k, v in kwargs.items() if v not in (None, False)}
        if unsupported:  # padding, truncation, tensors: transformers' job
            raise TypeError(f"{', '.join(unsupported)} need the transformers package (pip install transformers); "
                            f"forge's own tokenizer returns plain lists of ids")
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return BatchEncoding(input_ids=ids, attention_mask=[1] * len(ids))
        ids = [self.encode(t, add_special_tokens) for t in text]
        return BatchEncoding(input_ids=ids, attention_mask=[[1] * len(i) for i in ids])

    def decode(self, token_ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.tokenizer.id_to_token(ids)
        return [self.tokenizer.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.tokenizer.token_to_id(tokens)
        return [self.tokenizer.token_to_id(t) for t in tokens]

    # -- chat ----------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], tools: list[dict] | None = None, *,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, return_dict: bool = False, chat_template: str | None = None,
                            **kwargs: Any) -> Any:
        """As transformers': token ids by default (tokenize=True), the text with tokenize=False, a
        BatchEncoding with return_dict=True; a list of conversations gives a list of results."""
        if conversation and isinstance(conversation[0], (list, tuple)):
            return [self.apply_chat_template(c, tools, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tokenize=tokenize,
                                             return_dict=return_dict, chat_template=chat_template, **kwargs)
                    for c in conversation]
        text = self.tokenizer.apply_chat_template(list(conversation), tools=tools,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message,
                                                  chat_template=chat_template, **kwargs)
        if not tokenize:
            return text
        ids = self.tokenizer.encode(text)  # a rendered template carries its own special tokens
        return BatchEncoding(input_ids=ids, attention_mask=[1] * len(ids)) if return_dict else ids

    def __repr__(self) -> str:
        return f"HFCompatibleTokenizer(name_or_path={self.name_or_path!r}, vocab_size={len(self)})"
