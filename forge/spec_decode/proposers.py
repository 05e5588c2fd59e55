"""The proposer an engine's speculative_config asks for."""

from __future__ import annotations

from forge.config import EngineConfig
from forge.spec_decode.ngram import NgramProposer


def make_proposer(config: EngineConfig, loaded, max_model_len: int):
    """None without speculative_config; else an NgramProposer or a DraftModelProposer (which loads
    its model: build it before the target's KV cache, so that on a GPU the target's takes what is left)."""
    spec = config.speculative_config
    if spec is None:
        return None
    if spec.method == "ngram":
        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    from forge.spec_decode.draft_model import DraftModelProposer

    return DraftModelProposer(spec, config, loaded.tokenizer, max_model_len)
