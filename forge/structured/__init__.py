"""Structured outputs: exact grammar constraints over the whole vocabulary, with xgrammar.

A request's `StructuredOutputsParams` (a JSON schema, any JSON object, a regex, a choice list or an
EBNF grammar) is compiled once per distinct spec per engine; each of its sequences gets a
`Matcher`. Before sampling, `apply_masks` sets the logits of every token the grammar forbids to
-inf in the constrained rows of the batch (on the logits' device); unconstrained rows are left
alone. Each matcher computes its next mask on a background thread right after it accepts a token,
so the work overlaps the next forward pass. The grammar's end ends the request: the only tokens
allowed there are the model's stop tokens, and accepting one terminates the matcher.

The engine calls just two functions:

    seq.structured = make_matcher(engine, params.structured_outputs)   # at add_request
    logits = apply_masks(logits, seqs)                                  # before sampling
"""

from __future__ import annotations

import torch

from forge.sampling_params import StructuredOutputsParams
from forge.structured.backend import Matcher, StructuredBackend, build_tokenizer_info, spec_key

__all__ = ["make_matcher", "apply_masks", "get_backend", "Matcher", "StructuredBackend",
           "build_tokenizer_info", "spec_key"]


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


def apply_masks(logits: torch.Tensor, seqs) -> torch.Tensor:
    """Mask (in place) the rows of `logits` whose sequence is constrained; returns `logits`."""
    rows = [i for i, s in enumerate(seqs) if s.structured is not None]
    if not rows:
        return logits
    return seqs[rows[0]].structured.backend.apply(logits, seqs, rows)
