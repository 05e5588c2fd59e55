"""Speculative decoding: cheap proposals of the next tokens, verified by the target model in one step.

    config.py       SpeculativeConfig (vLLM's speculative_config: method ngram | draft_model)
    ngram.py        prompt lookup: the tokens that followed the sequence's last n-gram earlier in it
    draft_model.py  a small model with its own KV cache proposes k tokens, one batched forward each
    adaptive.py     per-sequence draft length: stop proposing while drafts are rarely accepted
    verify.py       which drafts a verify step accepted

Where it sits in the step (forge.engine.core): the proposer fills `Sequence.spec_token_ids` before
`Scheduler.schedule()`, which reserves their KV slots and plans a row of 1 + k tokens that returns
k + 1 logits; the sampler draws a token at each of those positions with the request's own noise
(the draw at output position i is keyed by (stream, i) whatever the step, forge.kernels.sampling),
and the drafts are accepted while they equal the drawn tokens. The tokens that come out are
therefore exactly those plain decoding draws: lossless for greedy and sampled requests alike.
"""

from forge.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
