"""Draft-model proposer: a smaller model with the same tokenizer proposes k tokens per sequence.

It owns a model runner (forge.engine.model_runner) with its own KV cache and block pool; each
sequence's draft state is a block table and the tokens whose K/V the draft cache holds. Per step,
for the proposing sequences together: one forward that catches each sequence up (the tokens it
gained since its last proposal: the accepted drafts and the drawn token; a whole prompt the first
time), then one batched forward per further draft position (a decode step, CUDA graphs apply).
Each draft token is drawn with the request's sampling parameters and the noise the target will
use at that output position (greedy requests: the argmax), so drafts agree with the target's draws
as often as the two distributions allow. Draft K/V of rejected drafts is dropped at the next
proposal (the state keeps only the prefix it shares with the sequence's tokens).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from forge.config import EngineConfig
from forge.engine.block_manager import BlockManager
from forge.engine.logit_bias import apply_logit_bias
from forge.engine.model_runner import ModelRunner
from forge.engine.plan import StepPlan
from forge.engine.sampler import Sampler
from forge.errors import InvalidRequestError
from forge.loader import load_model
from forge.quant import keeps_gguf_quantized
from forge.sequence import Sequence, SequenceStatus
from forge.spec_decode.config import PARAM, SpeculativeConfig

logger = logging.getLogger("forge")

GPU_DRAFT_KV_FRACTION = 0.05  # of the GPU's memory, at most, for the draft's KV cache (taken before the target's)


@dataclass
class DraftState:
    """One sequence in the draft cache (BlockManager reads block_table / block_hashes / num_computed_tokens)."""

    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # whose K/V the draft cache holds, in order


def check_same_tokenizer(draft, target, path) -> None:
    """Drafts are token ids of the target's vocabulary: the two tokenizers must be the same one."""
    a, b = draft.backend_tokenizer, target.backend_tokenizer
    same = a.get_vocab(with_added_tokens=True) == b.get_vocab(with_added_tokens=True) and \
        draft.eos_token_id == target.eos_token_id
    if not same:
        raise InvalidRequestError(f"speculative_config model {str(path)!r} has a different tokenizer from the target "
                                  f"model: a draft model must share the target's vocabulary", param=PARAM)


class DraftModelProposer:
    def __init__(self, spec: SpeculativeConfig, config: EngineConfig, target_tokenizer, max_model_len: int):
        if config.tensor_parallel_size > 1:
            raise InvalidRequestError("speculative_config method draft_model does not support tensor parallelism "
                                      "(use method ngram)", param=PARAM)
        loaded = load_model(spec.model, keep_quantized=keeps_gguf_quantized(config.quantization, config.device, False))
        check_same_tokenizer(loaded.tokenizer, target_tokenizer, spec.model)
        self.max_model_len = min(max_model_len, loaded.config.max_position_embeddings)
        draft_config = dataclasses.replace(config, model=str(spec.model), speculative_config=None, load_format="auto",
                                           max_model_len=self.max_model_len, async_scheduling=False)
        draft_config.num_kv_blocks = self._num_blocks(loaded.config, config)
        self.runner = ModelRunner(loaded.config, loaded.weights, draft_config, self.max_model_len)
        del loaded
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size, enable_prefix_caching=False)
        self.sampler = Sampler(config.device)
        self.states: dict[int, tuple[Sequence, DraftState]] = {}
        self.max_drafts = spec.num_speculative_tokens

    def _num_blocks(self, model_config, config: EngineConfig) -> int | None:
        """The target's block count when set; on a GPU at most GPU_DRAFT_KV_FRACTION of its memory
        (the draft is built before the target, which takes what is left); on the CPU the runner's
        default (pages become resident only when used)."""
        if config.num_kv_blocks is not None or not config.device.startswith("cuda"):
            return config.num_kv_blocks
        dtype_bytes = 4 if config.dtype == "float32" else 2
        block_bytes = 2 * model_config.num_layers * config.block_size * model_config.num_kv_heads * \
            model_config.head_dim * dtype_bytes
        total = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
        per_seq = -(-self.max_model_len // config.block_size)
        return max(per_seq, min(config.max_num_seqs * per_seq, int(GPU_DRAFT_KV_FRACTION * total // block_bytes)))

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        self._drop_stale()
        rows = [(seq, k, state) for seq, k in zip(seqs, limits) if (state := self._prepare(seq, k)) is not None]
        drafts = {seq.seq_id: [] for seq in seqs}
        if not rows:
            return [[] for _ in seqs]
        # position 1: catch each sequence up and draw its first draft
        plan = StepPlan()
        for seq, _, state in rows:
            new = seq.token_ids[state.num_computed_tokens :]
            plan.add_row(seq.seq_id, seq.request_id, state.num_computed_tokens, new, list(state.block_table), 1, 1)
            state.tokens.extend(new)
            state.num_computed_tokens = len(state.tokens)
        self._draw(plan, [r[0] for r in rows], 0, drafts)
        # positions 2..k: one decode forward each, for the sequences that want that many
        for j in range(1, max(k for _, k, _ in rows)):
            active = [(seq, state) for seq, k, state in rows if k > j]
            if not active:
                break
            plan = StepPlan()
            for seq, state in active:
                token = drafts[seq.seq_id][-1]
                plan.add_row(seq.seq_id, seq.request_id, state.num_computed_tokens, [token], list(state.block_table), 1, 1)
                state.tokens.append(token)
                state.num_computed_tokens += 1
            self._draw(plan, [seq for seq, _ in active], j, drafts)
        return [drafts[seq.seq_id] for seq in seqs]

    def _draw(self, plan: StepPlan, seqs: list[Sequence], offset: int, drafts: dict[int, list[int]]) -> None:
        logits = apply_logit_bias(self.runner.execute(plan), seqs)
        for seq, result in zip(seqs, self.sampler(logits, seqs, [offset] * len(seqs))):
            drafts[seq.seq_id].append(result.token_id)

    def _prepare(self, seq: Sequence, k: int) -> DraftState | None:
        """seq's draft state, holding only what it shares with seq's tokens, with slots for this
        step's k - 1 drafted tokens; None when the draft cache has no room (no drafts this step)."""
        entry = self.states.get(seq.seq_id)
        state = entry[1] if entry is not None else DraftState()
        self.states[seq.seq_id] = (seq, state)
        tokens, shared = seq.token_ids, len(state.tokens)
        shared = min(shared, seq.num_tokens - 1)  # the last token is always run (its logits are the first draft's)
        first = max(0, shared - self.max_drafts - 1)  # only the last drafts can differ
        for i in range(first, shared):
            if state.tokens[i] != tokens[i]:
                shared = i
                break
        del state.tokens[shared:]
        state.num_computed_tokens = shared
        need = seq.num_tokens + k - 1 - shared
        if seq.num_tokens + k - 1 > self.max_model_len or not self.block_manager.can_append(state, need):
            return None
        self.block_manager.append_slots(state, need)
        return state

    def _drop_stale(self) -> None:
        """Free the draft cache of sequences that finished or were preempted."""
        for seq_id in [i for i, (seq, _) in self.states.items() if seq.status != SequenceStatus.RUNNING]:
            _, state = self.states.pop(seq_id)
            self.block_manager.free(state)
