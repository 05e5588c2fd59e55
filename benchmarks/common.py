"""Shared benchmark helpers: model shapes, dummy-weight model directories, result files."""

import json
import os
import shutil
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    # SmolLM2-135M (the default model's shape)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    # Llama-3.2-1B (issue 18 compares batch-1 step time with a published megakernel on this model)
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Llama-3.1-8B
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         tie_word_embeddings=False, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Llama-3.1-70B (bf16: 141 GB, more than one H200 holds; int4 fits: benchmarks/decode.py --quantization int4)
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                          tie_word_embeddings=False, max_position_embeddings=131072,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}

# Weight formats of the GPU benchmarks (decode.py --quantization, throughput.py --formats): bf16 = no
# quantization in bfloat16; fp8 = e4m3 weights quantized at load; int4 = group-128 weight-only.
WEIGHT_FORMATS = {"bf16": "none", "fp8": "fp8", "int4": "int4"}


def format_engine_kwargs(name: str) -> dict:
    """'bf16' / 'fp8' / 'int4', optionally + '+fp8kv' (the FP8 KV cache) -> EngineConfig keyword arguments."""
    fmt, plus, kv = name.partition("+")
    if fmt not in WEIGHT_FORMATS or (plus and kv != "fp8kv"):
        raise ValueError(f"format {name!r}: expected one of {', '.join(WEIGHT_FORMATS)}, optionally with '+fp8kv'")
    return {"quantization": WEIGHT_FORMATS[fmt], "dtype": "bfloat16", "kv_cache_dtype": "fp8" if plus else "auto"}


def hf_config_dict(shape: str, **overrides) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    cfg.update(SHAPES[shape])
    cfg.update(overrides)
    return cfg


def dummy_model_dir(shape: str, root: Path | None = None, **overrides) -> Path:
    """A model directory with config.json and the default model's tokenizer, for load_format='dummy'."""
    from forge.loader import default_model_path
    from forge.loader.gguf_header import GGUFHeader
    from forge.tokenizer import Tokenizer

    root = Path(root or os.environ.get("TMPDIR", "/tmp")) / f"forge-dummy-{shape}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(hf_config_dict(shape, **overrides), indent=2))
    tokenizer_src = os.environ.get("FORGE_TOKENIZER_DIR")
    if tokenizer_src:  # a directory with tokenizer.json (the device has no GGUF of the default model)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_src) / name, root / name)
    else:
        Tokenizer.from_gguf_metadata(GGUFHeader(default_model_path()).metadata).save_hf_dir(root)
    return root


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    out = os.environ.get("OUT")
    if out:
        shutil.copy(path, Path(out) / path.name)
    return path


def run_batches(engine, batch_sizes, prompt_len: int, output_len: int) -> dict:
    """Greedy decode of `bs` random prompts per batch size (ignore_eos); the first run warms up.
    Returns {bs: tok_s (whole run), decode_tok_s (after every sequence has its first token), ms_per_step}}."""
    import torch

    from forge import SamplingParams

    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    results = {}
    for bs in [batch_sizes[0]] + list(batch_sizes):  # the first run warms up
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        for _ in range(bs):
            engine.add_request({"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=g).tolist()}, params)
        torch.cuda.synchronize()
        start = time.perf_counter()
        first_decode = None
        while engine.has_unfinished_requests():
            engine.step(emit="finished")
            if first_decode is None and all(s.num_output_tokens >= 1 for s in engine.scheduler.running):
                torch.cuda.synchronize()
                first_decode = time.perf_counter()
        torch.cuda.synchronize()
        end = time.perf_counter()
        decode_tok_s = bs * (output_len - 1) / (end - first_decode)
        results[bs] = {"tok_s": bs * output_len / (end - start), "decode_tok_s": decode_tok_s,
                       "ms_per_step": 1000 * bs / decode_tok_s}
    return results


def offline_requests(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list:
    """n (random prompt, greedy SamplingParams) pairs, prompt and output lengths uniform in [lo, hi]."""
    import random

    from forge import SamplingParams

    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(lo, hi))],
             SamplingParams(temperature=0, max_tokens=rng.randint(lo, hi), ignore_eos=True)) for _ in range(n)]


def run_offline(engine, offline: list, synchronize=lambda: None) -> dict:
    """Offline throughput: one warm-up request, then every request of `offline` at once (ignore_eos,
    so each generates its max_tokens); output and total (prompt included) tokens per second."""
    engine.add_request({"prompt_token_ids": offline[0][0]}, offline[0][1])
    while engine.has_unfinished_requests():
        engine.step(emit="finished")
    start = time.perf_counter()
    for prompt, params in offline:
        engine.add_request({"prompt_token_ids": prompt}, params)
    while engine.has_unfinished_requests():
        engine.step(emit="finished")
    synchronize()
    seconds = time.perf_counter() - start
    generated = sum(p.max_tokens for _, p in offline)
    return {"requests": len(offline), "seconds": round(seconds, 2), "output_tok_s": round(generated / seconds, 1),
            "total_tok_s": round((generated + sum(len(p) for p, _ in offline)) / seconds, 1)}


def time_hf_generate(model, vocab_size: int, batch: int, prompt_len: int, new_tokens: int, device: str = "cuda") -> float:
    """Seconds for HF transformers' generate() of `new_tokens` greedy tokens (no EOS stop) after
    `batch` random prompts of `prompt_len` tokens: the HF side of the same-run comparisons."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    ids = torch.randint(0, vocab_size, (batch, prompt_len), device=device)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
    sync()
    return time.perf_counter() - start


# -- next-token distributions over a fixed text, and their KL divergence -----------------------------

KL_TEXT = Path(__file__).resolve().parent / "data" / "kl_text.txt"


def window_logprobs(runner, ids: list[int], window: int, decode_tokens: int = 0):
    """Log-softmax (float64 [n, vocab]) of the next-token distribution at every position of `ids`, cut
    into independent windows of `window` tokens, read straight from a ModelRunner (runner.model,
    runner.kv_caches; slots 0.. of the cache, so the engine must be idle). Yields (window ids, logprobs).

    The first n - decode_tokens positions of each window are scored by one prefill forward pass; the last
    `decode_tokens` by one single-token decode step each (teacher forced: the text's own next token), so
    the decode attention path (on CUDA the paged decode kernel) and, with a quantized KV cache, its
    reads of every earlier token from the cache are measured too."""
    import torch

    from forge.ops.metadata import AttentionMetadata

    device = runner.device

    def step(tokens: list[int], start: int, blocks: int) -> torch.Tensor:
        n, ctx = len(tokens), start + len(tokens)
        meta = AttentionMetadata(
            positions=torch.arange(start, ctx, device=device), slot_mapping=torch.arange(start, ctx, device=device),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
            context_lens=torch.tensor([ctx], dtype=torch.int32, device=device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None], max_query_len=n,
            max_context_len=ctx, query_lens_cpu=[n], context_lens_cpu=[ctx])
        hidden = runner.model.forward(torch.tensor(tokens, device=device), meta, runner.kv_caches)
        return torch.log_softmax(runner.model.compute_logits(hidden).double(), -1).cpu()

    for begin in range(0, len(ids), window):
        chunk = ids[begin : begin + window]
        n = len(chunk)
        blocks = -(-n // runner.block_size)
        prefill = max(1, n - decode_tokens)
        with torch.inference_mode():
            parts = [step(chunk[:prefill], 0, blocks)]
            parts += [step(chunk[j : j + 1], j, blocks) for j in range(prefill, n)]
        yield chunk, torch.cat(parts)


def kl_terms(ref_logprobs, logprobs):
    """Per position: KL(ref || other) in nats (float64) and whether the top-1 tokens agree."""
    p, q = ref_logprobs.double(), logprobs.double()
    return (p.exp() * (p - q)).sum(-1), p.argmax(-1) == q.argmax(-1)


def kl_summary(kls: list, top1: list) -> dict:
    """Mean / p99 / max KL and top-1 agreement over the concatenated per-position terms."""
    import torch

    kl = torch.cat(kls)
    return {"tokens": kl.numel(), "mean": kl.mean().item(), "p99": kl.quantile(0.99).item(), "max": kl.max().item(),
            "top1_agreement": torch.cat(top1).double().mean().item()}
