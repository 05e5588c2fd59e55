"""Helpers for tests: random-weight Llama models of any shape, saved as HF directories."""

import random
from pathlib import Path

import torch

from forge.config import ModelConfig
from forge.loader.safetensors import save_hf_dir


def default_tokenizer():
    """The default model's tokenizer: the tokenizer.json carried to the GPU machine (which has no
    GGUF) when present ($FORGE_TOKENIZER_DIR or .device/tokenizer), else read from the GGUF."""
    import os

    from forge.tokenizer import Tokenizer

    carried = Path(os.environ.get("FORGE_TOKENIZER_DIR", Path(__file__).resolve().parents[1] / ".device" / "tokenizer"))
    if (carried / "tokenizer.json").exists():
        return Tokenizer.from_hf_dir(carried)
    from forge.loader import default_model_path
    from forge.loader.gguf_header import GGUFHeader

    return Tokenizer.from_gguf_metadata(GGUFHeader(default_model_path()).metadata)


def random_prompts(n: int, seed: int = 0, lo: int = 5, hi: int = 120) -> list[dict]:
    """n prompts of random token ids (lengths in [lo, hi]) in the offline API's dict form."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(49152) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


def random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Float32 CPU weights of the schema's names and shapes: matrices N(0, scale), embeddings 10x that
    (so tokens are told apart), norms 1 + N(0, scale)."""
    from forge.models.schema import dummy_weights

    return dummy_weights(config, "cpu", torch.float32, seed, scale=scale, embedding_scale=10, norm_noise=True)


def write_tiny_gguf(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor], metadata_source: Path,
                    q8_0: bool = False) -> Path:
    """A float32 GGUF written the way llama.cpp's converter writes the config's family: its
    architecture, metadata keys and tensor names (the schema's), Q/K rows permuted for the "llama"
    arch's interleaved RoPE, Gemma's norms stored as 1 + w, LongRoPE factors as tensors, MoE experts
    stacked (ffn_*_exps) with the expert_* keys; with the tokenizer metadata of `metadata_source` (a
    GGUF whose vocabulary fits the config). q8_0: the decoder's matrices (not the embeddings) in Q8_0 blocks."""
    import numpy as np
    from gguf import GGUFWriter, RopeScalingType

    from forge.loader.gguf_header import GGUFHeader
    from forge.models.families import family_of
    from forge.models.schema import expand

    def permute(w, n_head):  # llama.cpp's convert script: HF half-split rows -> interleaved pairs
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    family = family_of(config)
    w = GGUFWriter(str(path), family.gguf_arch)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.num_experts:  # (MoE: llama.cpp's expert keys; the experts' tensors are stacked, [E, out, in])
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_weights_norm(config.norm_topk_prob)
    if config.sliding_window is not None:
        w.add_sliding_window(config.sliding_window)
        if config.layer_types is not None:
            w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    if config.rope_local_theta is not None:
        w.add_float32(f"{family.gguf_arch}.rope.freq_base_swa", config.rope_local_theta)
    if config.query_pre_attn_scalar is not None:
        w.add_attention_scale(config.attention_scale)
    if config.attn_logit_softcap is not None:
        w.add_attn_logit_softcapping(config.attn_logit_softcap)
    if config.final_logit_softcap is not None:
        w.add_final_logit_softcapping(config.final_logit_softcap)
    rs = config.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs.factor)
    elif rs is not None and rs.rope_type == "longrope":
        w.add_rope_scaling_attn_factors(rs.attention_factor)
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
        w.add_tensor("rope_factors_long.weight", np.array(rs.long_factor, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rs.short_factor, dtype=np.float32))
    meta = GGUFHeader(metadata_source).metadata
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"][: config.vocab_size])
    w.add_token_types(meta["tokenizer.ggml.token_type"][: config.vocab_size])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id)
    for tensor in expand(config):
        t = weights[tensor.hf_name].float()
        if family.gguf_permute_qk and tensor.hf_name.endswith("q_proj.weight"):
            t = permute(t, config.num_heads)
        elif family.gguf_permute_qk and tensor.hf_name.endswith("k_proj.weight"):
            t = permute(t, config.num_kv_heads)
        elif tensor.spec.kind == "norm":
            t = t + family.norm_offset
        array = np.ascontiguousarray(t.numpy().astype(np.float32))
        if q8_0 and tensor.spec.kind in ("matrix", "router", "experts") and array.shape[-1] % 32 == 0:
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize

            w.add_tensor(tensor.gguf_name, quantize(array, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(tensor.gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_config(vocab_size: int = 49152, **overrides) -> ModelConfig:
    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def make_random_model_dir(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    config = tiny_config(vocab_size=tokenizer.vocab_size, **overrides)
    save_hf_dir(path, config, random_weights(config, seed), tokenizer)
    return path


class TinyHFModel:
    """A tiny random-weight model made with transformers' own class (`config`), saved with
    save_pretrained under root/name with the default model's tokenizer, and its forge engine: the
    reference the family tests (tests/test_families.py, tests/test_moe_models.py) compare against."""

    def __init__(self, name: str, config, root: Path, tokenizer, prompt_len: int, max_model_len: int):
        import transformers

        self.prompt_len, self.max_model_len = prompt_len, max_model_len
        config._attn_implementation = "eager"  # (soft-capping; and the plainest reference)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # norms and biases away from their 1 / 0 initial values
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        model.generation_config.eos_token_id = None  # 32 tokens whatever they are
        self.path = root / name
        model.save_pretrained(self.path)
        tokenizer.save_hf_dir(self.path)
        self.hf = model
        self.prompt = torch.randint(3, tokenizer.vocab_size, (prompt_len,), generator=g).tolist()
        self.llm = self.engine()

    def engine(self, path=None, **kwargs):
        from forge import LLM

        kwargs = {"quantization": "none", "max_model_len": self.max_model_len, "num_kv_blocks": 64} | kwargs
        return LLM(str(path or self.path), **kwargs)

    @staticmethod
    def greedy(llm, prompts: list[list[int]], n: int = 32) -> list[list[int]]:
        from forge import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]


def single_sequence_metadata(num_tokens: int, block_size: int):
    """Attention metadata for one fresh sequence occupying blocks 0, 1, 2, ... of the cache."""
    from forge.ops.metadata import AttentionMetadata

    num_blocks = -(-num_tokens // block_size)
    return AttentionMetadata(
        positions=torch.arange(num_tokens),
        slot_mapping=torch.arange(num_tokens),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        context_lens=torch.tensor([num_tokens], dtype=torch.int32),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        max_query_len=num_tokens,
        max_context_len=num_tokens,
        query_lens_cpu=[num_tokens],
        context_lens_cpu=[num_tokens],
    )


@torch.inference_mode()
def forward_logits(runner, token_ids: list[int]) -> torch.Tensor:
    """All-position logits of one prompt through a ModelRunner's model (uses its KV cache blocks 0..)."""
    meta = single_sequence_metadata(len(token_ids), runner.block_size)
    ids = torch.tensor(token_ids, device=runner.device)
    meta.positions, meta.slot_mapping = meta.positions.to(runner.device), meta.slot_mapping.to(runner.device)
    meta.block_tables = meta.block_tables.to(runner.device)
    meta.context_lens = meta.context_lens.to(runner.device)
    meta.query_start_loc = meta.query_start_loc.to(runner.device)
    hidden = runner.model.forward(ids, meta, runner.kv_caches)
    return runner.model.compute_logits(hidden)


# Sampling values at the edges of what SamplingParams accepts, and logits rows a sampler must survive
# (tests/test_validation.py on the CPU, tests/cuda/test_sampling.py on the GPU).
SAMPLING_EDGES = {
    "temperature": [0.0, 5e-324, 1e-38, 9.99e-6, 1e-5, 0.7, 1.0, 2.0, 1e4, 1e300],
    "top_p": [5e-324, 1e-320, 1e-10, 0.3, 0.95, 1.0],
    "top_k": [-1, 0, 1, 2, 40, 10**12],
    "min_p": [0.0, 5e-324, 0.05, 0.999999, 1.0],
    "repetition_penalty": [0.01, 0.9, 1.0, 1.3, 100.0],
    "presence_penalty": [-2.0, 0.0, 2.0],
    "frequency_penalty": [-2.0, 0.0, 2.0],
    "logprobs": [None, 0, 3, 20],
}
LOGIT_KINDS = ("normal", "huge", "masked", "one_left", "overflow", "all_masked")


def random_edge_params(rng: random.Random, **fixed):
    from forge import SamplingParams

    values = {name: rng.choice(options) for name, options in SAMPLING_EDGES.items()}
    return SamplingParams(seed=rng.randrange(-(2**63), 2**63), max_tokens=None, **(values | fixed))


def random_edge_logits(rng: random.Random, kind: str, vocab: int) -> torch.Tensor:
    """One float32 row: ordinary, spanning +-FLT_MAX, grammar-masked (-inf but a few), one token left,
    with NaN/+inf entries (a model that overflowed), or every token masked."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    big = torch.finfo(torch.float32).max
    row = torch.randn(vocab, generator=g) * rng.choice([1.0, 10.0])
    if kind == "huge":
        row = (torch.rand(vocab, generator=g) * 2 - 1) * big
        row[rng.randrange(vocab)], row[rng.randrange(vocab)] = big, -big
    elif kind in ("masked", "one_left"):
        keep = torch.randperm(vocab, generator=g)[: 1 if kind == "one_left" else rng.randint(2, 8)]
        masked = torch.full((vocab,), float("-inf"))
        masked[keep] = rng.choice([row[keep], -big * torch.rand(len(keep), generator=g), torch.full((len(keep),), big)])
        row = masked
    elif kind == "overflow":
        row[torch.randperm(vocab, generator=g)[:5]] = float("nan")
        row[torch.randperm(vocab, generator=g)[:2]] = float("inf")
    elif kind == "all_masked":
        row = torch.full((vocab,), float("-inf"))
    return row


def edge_sequence(rng: random.Random, params, row: torch.Tensor):
    """A Sequence whose history holds some of the row's unmasked tokens, so penalties hit them."""
    from forge.sequence import Sequence

    vocab = row.shape[-1]
    allowed = torch.nonzero(row > float("-inf")).flatten().tolist()
    prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))] + rng.sample(allowed, min(2, len(allowed)))
    seq = Sequence("r", prompt, params)
    seq.token_ids += [rng.randrange(vocab) for _ in range(rng.randint(0, 6))] + allowed[:1]
    return seq


def assert_valid_samples(rows: torch.Tensor, tokens: list[int], results=None) -> None:
    """Every token is in the vocabulary and, where the row has any unmasked logit, is one of them (never
    -inf or NaN); every returned logprob is finite and >= LOGPROB_FLOOR."""
    import math

    from forge.engine.sampler import LOGPROB_FLOOR

    rows = rows.cpu()
    for i, token in enumerate(tokens):
        assert 0 <= token < rows.shape[1], (i, token)
        allowed = rows[i] > float("-inf")  # (False for NaN)
        if allowed.any():
            assert allowed[token], (i, token, rows[i][token])
        if results is not None and results[i].logprob is not None:
            r = results[i]
            assert math.isfinite(r.logprob) and r.logprob >= LOGPROB_FLOOR, r.logprob
            assert all(math.isfinite(lp) and lp >= LOGPROB_FLOOR for _, lp in r.top_logprobs or [])


def check_sample_function_edges(device: str, vocab: int = 256, seed: int = 3) -> None:
    """forge.kernels.sampling.sample (the GPU sampler's math; its torch draw on CPU tensors) with the raw
    edge values, including temperatures the engine would have made greedy, on every kind of row."""
    from forge.kernels.sampling import sample

    rng = random.Random(seed)
    kinds = list(LOGIT_KINDS) * 2
    b = len(kinds)
    for name in ("temperature", "top_p", "top_k", "min_p"):
        for value in SAMPLING_EDGES[name]:
            rows = torch.stack([random_edge_logits(rng, kind, vocab) for kind in kinds])
            kw = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0} | {name: value}
            ids, chosen, _, top_lps = sample(
                rows.to(device), torch.full((b,), kw["temperature"], dtype=torch.float64, device=device),
                torch.full((b,), max(0, min(kw["top_k"], vocab)), dtype=torch.int64, device=device),
                torch.full((b,), kw["top_p"], dtype=torch.float64, device=device),
                torch.full((b,), kw["min_p"], dtype=torch.float64, device=device),
                torch.arange(b, dtype=torch.int64, device=device) * 7919,
                torch.full((b,), 3, dtype=torch.int64, device=device), num_logprobs=3)
            assert_valid_samples(rows, ids.tolist())
            live = [i for i, k in enumerate(kinds) if k != "all_masked"]  # (an all-masked row has no distribution)
            assert torch.isfinite(chosen[live]).all() and torch.isfinite(top_lps[live][:, 0]).all(), (name, value)
