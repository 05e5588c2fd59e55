"""logit_bias (OpenAI's): each request's {token id: bias} added to its rows of the logits before the
grammar masks and the sampler, on the logits' device, in one indexed add for the whole step."""

from __future__ import annotations

import torch

from forge.errors import InvalidRequestError
from forge.sampling_params import SamplingParams


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """Every biased id must be a token of the model (SamplingParams checked the rest)."""
    bad = [t for t in params.logit_bias or () if t >= vocab_size]
    if bad:
        raise InvalidRequestError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                                  param="logit_bias")


def apply_logit_bias(logits: torch.Tensor, seqs) -> torch.Tensor:
    """logits[i, t] += bias for each sequence i (row i) whose params carry logit_bias; in place."""
    rows, cols, values = [], [], []
    for i, seq in enumerate(seqs):
        bias = seq.params.logit_bias
        if bias:
            rows += [i] * len(bias)
            cols += bias.keys()
            values += bias.values()
    if not rows:
        return logits
    with torch.inference_mode():  # the model's logits are inference tensors
        index = torch.tensor([rows, cols], dtype=torch.int64).to(logits.device, non_blocking=True)
        add = torch.tensor(values, dtype=torch.float32).to(logits.device, non_blocking=True).to(logits.dtype)
        logits.index_put_((index[0], index[1]), add, accumulate=True)
    return logits
