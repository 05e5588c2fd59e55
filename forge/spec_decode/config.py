"""SpeculativeConfig: vLLM's `speculative_config` dict (or its JSON, `--speculative-config`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

from forge.errors import InvalidRequestError
from forge.validation import check_int

METHODS = ("ngram", "draft_model")
PARAM = "speculative_config"


@dataclass
class SpeculativeConfig:
    """method "ngram": propose the tokens that followed the longest suffix n-gram of the sequence
    (prompt_lookup_max down to prompt_lookup_min tokens) at its last earlier occurrence.
    method "draft_model": a smaller model with the same tokenizer (`model`: a .gguf file or an HF
    directory) proposes them. Either way at most `num_speculative_tokens` per sequence and step."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int | None = None  # ngram: longest n-gram matched (default 4)
    prompt_lookup_min: int | None = None  # ngram: shortest (default 2, or prompt_lookup_max if smaller)
    model: str | None = None  # draft_model: its path
    # Adaptive rule (forge.spec_decode.adaptive): a sequence whose recent drafts are accepted less
    # often than this stops proposing for a while. 0 turns the rule off.
    min_acceptance_rate: float = 0.25

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidRequestError(f"speculative_config method must be one of {', '.join(METHODS)}, got "
                                      f"{self.method!r}", param=PARAM)
        self.num_speculative_tokens = check_int(self.num_speculative_tokens,
                                                "speculative_config num_speculative_tokens", 1, 64, param=PARAM)
        if isinstance(self.min_acceptance_rate, bool) or not isinstance(self.min_acceptance_rate, (int, float)) \
                or not 0 <= self.min_acceptance_rate <= 1:
            raise InvalidRequestError(f"speculative_config min_acceptance_rate must be a number in [0, 1], got "
                                      f"{self.min_acceptance_rate!r}", param=PARAM)
        if self.method == "ngram":
            if self.model is not None:
                raise InvalidRequestError("speculative_config model is for method draft_model, not ngram", param=PARAM)
            hi = 4 if self.prompt_lookup_max is None else self.prompt_lookup_max
            self.prompt_lookup_max = check_int(hi, "speculative_config prompt_lookup_max", 1, 64, param=PARAM)
            lo = min(2, self.prompt_lookup_max) if self.prompt_lookup_min is None else self.prompt_lookup_min
            self.prompt_lookup_min = check_int(lo, "speculative_config prompt_lookup_min", 1, self.prompt_lookup_max,
                                               param=PARAM)
        else:
            if self.prompt_lookup_max is not None or self.prompt_lookup_min is not None:
                raise InvalidRequestError("speculative_config prompt_lookup_max/min are for method ngram, not "
                                          "draft_model", param=PARAM)
            if not isinstance(self.model, (str, os.PathLike)) or not os.fspath(self.model).strip():
                raise InvalidRequestError("speculative_config method draft_model needs model: the path of a "
                                          "smaller model with the same tokenizer", param=PARAM)
            if not os.path.exists(self.model):
                raise InvalidRequestError(f"speculative_config model {os.fspath(self.model)!r} does not exist",
                                          param=PARAM)

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """From a SpeculativeConfig, a dict (vLLM's keys) or its JSON text; None stays None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"speculative_config is not valid JSON: {exc}", param=PARAM) from None
        if not isinstance(value, dict):
            raise InvalidRequestError(f"speculative_config must be a dict (or its JSON), got {type(value).__name__}",
                                      param=PARAM)
        value = dict(value)
        if "method" not in value:  # vLLM infers the method: a model means a draft model
            value["method"] = "draft_model" if value.get("model") else "ngram"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(f"speculative_config has unknown key {unknown[0]!r} (known: "
                                      f"{', '.join(sorted(known))})", param=PARAM)
        return cls(**value)
