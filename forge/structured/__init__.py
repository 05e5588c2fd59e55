"""Structured outputs: exact grammar constraints over the whole vocabulary, with xgrammar.

A request's `StructuredOutputsParams` (a JSON schema, any JSON object, a regex, a choice list or an
EBNF grammar) is compiled once per distinct spec per engine; each of its sequences gets a
`Matcher`. Each step the masks of the constrained rows are filled while the forward pass runs,
then the logits of every token a grammar forbids are set to -inf in those rows (on the logits'
device); unconstrained rows are left alone. The grammar's end ends the request: the only tokens
allowed there are the model's stop tokens, and accepting one terminates the matcher.

The engine calls:

    seq.structured = make_matcher(engine, params.structured_outputs)   # at add_request
    masks = begin_masks(seqs)             # the step's sampled sequences, once their last tokens are pushed
    logits = masks.apply(logits)          # after the forward pass is launched, before sampling
    seq.structured.push(token)            # after sampling

`apply_masks(logits, seqs)` does both steps at once (tests, tools).
"""

from __future__ import annotations

import torch

from forge.sampling_params import StructuredOutputsParams
from forge.structured.backend import Matcher, StepMasks, StructuredBackend, build_tokenizer_info, spec_key

__all__ = ["make_matcher", "begin_masks", "apply_masks", "get_backend", "Matcher", "StepMasks",
           "StructuredBackend", "build_tokenizer_info", "spec_key"]


def get_backend(engine) -> StructuredBackend:
    """The engine's StructuredBackend, built on first use (tokenizer info ~0.1 s)."""
    backend = engine.__dict__.get("_structured_backend")
    if backend is None:
        stops = set(engine.tokenizer.stop_token_ids) | set(getattr(engine, "eos_token_ids", ()))
        backend = StructuredBackend(engine.tokenizer, engine.model_config.vocab_size, stops,
                                    device=str(getattr(engine.config, "device", "cpu")))
        engine.__dict__["_structured_backend"] = backend
    return backend


def make_matcher(engine, spec: StructuredOutputsParams) -> Matcher:
    """A fresh matcher for one sequence; raises forge.errors.InvalidRequestError (param
    "response_format") if the spec cannot be compiled."""
    return get_backend(engine).matcher(spec)


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
