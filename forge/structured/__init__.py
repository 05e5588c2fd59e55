"""Structured outputs: exact grammar constraints over the whole vocabulary, with xgrammar.

A request's `StructuredOutputsParams` (a JSON schema, any JSON object, a regex, a choice list or an
EBNF grammar) is compiled once per distinct spec per engine; each of its sequences gets a
`Matcher`. Each step the masks of the constrained rows are filled while the forward pass runs,
then the logits of every token a grammar forbids are set to -inf in those rows (on the logits'
device); unconstrained rows are left alone. The grammar's end ends the request: the only tokens
allowed there are the model's stop tokens, and accepting one terminates the matcher.

Limits (forge/structured/backend.py): a spec's canonical text at most 64 KiB; on the server, a
compile at most 10 s, run off the engine thread; compiled grammars cached up to 256 MiB.

The server compiles a request's spec before handing it to the engine thread:

    compiled = await asyncio.wrap_future(engine.structured_backend.compile_in_background(spec))

and the engine (forge.engine.core.EngineCore owns the backend, built on first use from explicit
inputs: the tokenizer, the logits' width, the stop token ids and the device) calls:

    seq.structured = backend.matcher(params.structured_outputs, compiled)  # InputProcessor.make_request
    masks = backend.begin_step(seqs)      # the step's sampled sequences, once their last tokens are pushed
    logits = masks.apply(logits)          # after the forward pass is launched, before sampling
    seq.structured.push(token)            # OutputProcessor.add_token, after sampling

`apply_masks(logits, seqs)` does both steps at once (tests, tools).
"""

from __future__ import annotations

import torch

from forge.sampling_params import StructuredOutputsParams
from forge.structured.backend import (
    CACHE_BYTES,
    COMPILE_TIMEOUT_S,
    MAX_SPEC_BYTES,
    Matcher,
    StepMasks,
    StructuredBackend,
    build_tokenizer_info,
    spec_key,
)

__all__ = ["make_matcher", "begin_masks", "apply_masks", "get_backend", "Matcher", "StepMasks",
           "StructuredBackend", "build_tokenizer_info", "spec_key", "MAX_SPEC_BYTES", "COMPILE_TIMEOUT_S",
           "CACHE_BYTES"]


def get_backend(engine) -> StructuredBackend:
    """The engine's StructuredBackend (LLMEngine.structured_backend, built on first use)."""
    return engine.structured_backend


def make_matcher(engine, spec: StructuredOutputsParams, compiled=None) -> Matcher:
    """A fresh matcher for one sequence, from `compiled` if the spec was compiled already; raises
    forge.errors.InvalidRequestError (param "response_format") if the spec cannot be compiled."""
    return engine.structured_backend.matcher(spec, compiled)


def begin_masks(seqs) -> StepMasks | None:
    """The masks of a step whose sampled sequences are `seqs` (None: none is constrained)."""
    for s in seqs:
        if s.structured is not None:
            return s.structured.backend.begin_step(seqs)
    return None


def apply_masks(logits: torch.Tensor, seqs) -> torch.Tensor:
    """Mask (in place) the rows of `logits` whose sequence is constrained; returns `logits`."""
    masks = begin_masks(seqs)
    return logits if masks is None else masks.apply(logits)
