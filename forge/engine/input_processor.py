"""Input processing: a prompt and its SamplingParams become a checked `Request` and its `n`
Sequences (tokenized, validated against the model and the context, grammars attached), before
the engine core sees them. Every refusal is an InvalidRequestError (or PromptTooLongError) naming
the parameter at fault."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Container

from forge.engine.logit_bias import check_logit_bias
from forge.errors import InvalidRequestError, PromptTooLongError
from forge.sampling_params import SamplingParams
from forge.sequence import Request, Sequence
from forge.tokenizer import IncrementalDetokenizer, Tokenizer
from forge.validation import check_token_ids


class InputProcessor:
    """`make_matcher(spec, compiled)`: a grammar matcher from the engine core's structured backend."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, context_limit: str,
                 max_logprobs: int, make_matcher: Callable):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.context_limit = context_limit  # what sets max_model_len, for error messages
        self.max_logprobs = max_logprobs
        self.make_matcher = make_matcher
        self._ids = itertools.count()

    def make_request(self, prompt: str | dict | list[int], params: SamplingParams | None, request_id: str | None,
                     grammar=None, ids_in_use: Container[str] = ()) -> Request:
        """The request, checked, with its sequences. `grammar`: params.structured_outputs already
        compiled (the server compiles it off the engine thread); without it the spec is compiled here."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}",
                                      param="sampling_params")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidRequestError(f"request id must be a string, got {type(request_id).__name__}",
                                      param="request_id")
        text, ids = self.tokenize_prompt(prompt)
        self.validate_prompt(ids, params)
        check_logit_bias(params, self.vocab_size)
        params = self.resolve_logprobs(params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in ids_in_use:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        req = Request(request_id, text, ids, params)
        for i in range(params.n):
            detok = IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens)
            seq = Sequence(request_id, ids, params, index=i, detokenizer=detok)
            if params.structured_outputs is not None:
                matcher = self.make_matcher(params.structured_outputs, grammar)
                if params.structured_outputs.reasoning_end:  # free until the reasoning ends
                    from forge.structured.reasoning_gate import ReasoningGate

                    seq.reasoning_gate = ReasoningGate(matcher, params.structured_outputs.reasoning_end)
                else:
                    seq.structured = matcher
            req.seqs.append(seq)
        return req

    def tokenize_prompt(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        """A prompt is text, a list of token ids, or a dict with "prompt" (text) or "prompt_token_ids"."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")
                if text is not None and not isinstance(text, str):
                    raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
                return text, check_token_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise InvalidRequestError(f"a prompt dict needs 'prompt' (text) or 'prompt_token_ids', got keys "
                                          f"{sorted(map(str, prompt))[:5]}", param="prompt")
            prompt = prompt["prompt"]
            if not isinstance(prompt, str):
                raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}", param="prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", param="prompt")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
            return None, check_token_ids(prompt)
        raise InvalidRequestError(f"prompt must be a string, a list of token ids or a dict with 'prompt' or "
                                  f"'prompt_token_ids', got {type(prompt).__name__}", param="prompt")

    def validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(ids)} tokens but {self.context_limit}", param="prompt")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {len(ids) + params.max_tokens} "
                f"exceeds the context: {self.context_limit}", param="max_tokens")
        if len(ids) + params.min_tokens > self.max_model_len:  # (only reachable with max_tokens=None)
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + min_tokens ({params.min_tokens}) = {len(ids) + params.min_tokens} "
                f"exceeds the context: {self.context_limit}", param="min_tokens")

    def resolve_logprobs(self, params: SamplingParams) -> SamplingParams:
        """Check logprobs / prompt_logprobs against max_logprobs, as vLLM does; -1 (the whole vocabulary)
        and anything beyond it become the vocabulary size, which the sampler takes as a plain count."""
        vocab, limit = self.vocab_size, self.max_logprobs
        resolved = {}
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is None:
                continue
            wanted = vocab if n == -1 else min(n, vocab)
            if limit != -1 and wanted > limit:
                asked = f"{name}=-1 (the whole vocabulary, {vocab} tokens)" if n == -1 else f"{name}={n}"
                raise InvalidRequestError(f"{asked} is more than max_logprobs={limit}; raise it with "
                                          f"LLM(max_logprobs=...) or --max-logprobs (-1 allows the whole vocabulary)",
                                          param=name)
            if wanted != n:
                resolved[name] = wanted
        return dataclasses.replace(params, **resolved) if resolved else params
