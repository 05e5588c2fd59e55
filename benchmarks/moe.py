"""MoE on the GPU: one Qwen3-30B-A3B MoE layer (128 experts, top 8, hidden 2048, expert width 768) and
the whole model with random weights, forge vs HF transformers, bf16.

Layer: route + experts (forge.ops.moe, torch's grouped GEMM) at 1 / 32 / 256 / 2048 tokens, timed by
CUDA-graph replay; the bytes of the experts the tokens picked (each read once) over the time, against
the measured copy bandwidth.
Model: decode batch 1 and 32 (128-token random prompts, ignore_eos) and offline throughput (256
requests, prompt and output lengths uniform in [100, 1024] — fewer with --quick), forge (dummy
weights) vs transformers' Qwen3MoeForCausalLM (grouped_mm experts, generate) in the same run; batch-1
decode as a fraction of the bandwidth roofline of the *active* weights (attention, router, the 8
experts a token picks in each layer, norms, embedding row and lm_head).

    python benchmarks/moe.py [--parts layer model] [--quick] [--no-hf]
Writes benchmarks/results/moe.json.
"""

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import offline_requests, time_hf_generate, write_results  # noqa: E402

H200_COPY_BANDWIDTH = 4.22e12  # bytes/s (read + written), measured on the lent H200

# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B)
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=40960, tie_word_embeddings=False, hidden_act="silu", bos_token_id=151643,
    eos_token_id=151645, torch_dtype="bfloat16",
)


def measure_copy_bandwidth() -> float:
    from benchmarks.decode import measure_copy_bandwidth as measure

    return measure()


def time_graph(fn, iters: int = 50) -> float:
    """Seconds per call of fn, replayed from a CUDA graph (no launch overhead), median of 5 runs."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / iters)
    return sorted(times)[2]


def print_kernel_times(fn, iters: int = 20) -> None:
    """The GPU time of each kernel of one call (torch.profiler), the largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70), flush=True)


def layer_part(bandwidth: float, token_counts=(1, 4, 8, 16, 32, 64, 256, 2048)) -> list[dict]:
    """One MoE layer (route + experts) per implementation: forge's expert-by-expert kernel (moe.cu) and
    torch's grouped GEMM; CudaOps.moe_experts picks the first up to MOE_KERNEL_MAX_PAIRS pairs."""
    from forge.kernels import moe as moe_kernel
    from forge.ops import moe
    from forge.ops.cuda import CudaOps

    c = QWEN3_30B_A3B
    hidden, inter, experts, top_k = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"], c["num_experts_per_tok"]
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    down = torch.randn(experts, hidden, inter, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    router = torch.randn(experts, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    ops = CudaOps()

    def kernel(x, weights, ids):
        return moe_kernel.experts(x, weights, ids, gate_up, down)

    def grouped(x, weights, ids):
        return moe.experts_grouped_mm(ops, x, weights, ids, gate_up, down)

    rows = []
    for t in token_counts:
        x = torch.randn(t, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        _, ids = ops.moe_route(ops.linear(x, router), top_k, True)
        picked = int(ids.unique().numel())
        weight_bytes = picked * 3 * hidden * inter * 2 + router.numel() * 2
        row = {"tokens": t, "experts_picked": picked, "weight_mb": round(weight_bytes / 1e6, 1)}
        for name, experts_fn in (("kernel", kernel), ("grouped_mm", grouped)):
            if name == "kernel" and t * top_k > 4 * 256:
                continue

            def moe_layer(x=x, experts_fn=experts_fn):
                weights, ids = ops.moe_route(ops.linear(x, router), top_k, True)
                return experts_fn(x, weights, ids)

            seconds = time_graph(moe_layer)
            if t == 1:
                print_kernel_times(moe_layer)
            row[name] = {"us": round(seconds * 1e6, 1), "weight_gb_s": round(weight_bytes / seconds / 1e9, 1),
                         "fraction_of_copy_bandwidth": round(weight_bytes / seconds / bandwidth, 3),
                         "tflop_s": round(2 * t * top_k * 3 * hidden * inter / seconds / 1e12, 1)}
        rows.append(row)
        print(f"layer T={t:5d}: {row}", flush=True)
    return rows


def active_weight_bytes(c: dict, dtype_bytes: int = 2) -> int:
    """Weights one decode token reads: per layer attention (q, k, v, o, q/k norms), the router, its top-k
    experts and two norms; plus its embedding row, the final norm and the lm_head."""
    h, d = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = h * (q + 2 * kv) + q * h + 2 * d
    experts = c["num_experts_per_tok"] * 3 * h * c["moe_intermediate_size"]
    layer = attention + c["num_experts"] * h + experts + 2 * h
    return dtype_bytes * (c["num_hidden_layers"] * layer + h + h + c["vocab_size"] * h)


def dummy_dir(root: Path, cfg: dict) -> Path:
    import json
    import os
    import shutil

    from forge.tokenizer import Tokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer_src = os.environ.get("FORGE_TOKENIZER_DIR")
    if tokenizer_src:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_src) / name, root / name)
    else:
        from forge.loader import default_model_path
        from forge.loader.gguf_header import GGUFHeader

        Tokenizer.from_gguf_metadata(GGUFHeader(default_model_path()).metadata).save_hf_dir(root)
    return root


def forge_part(model_dir: Path, batch_sizes, prompt_len, output_len, offline) -> dict:
    from benchmarks.common import run_batches, run_offline
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
                                    max_model_len=2048 + 16, max_num_seqs=64, max_num_batched_tokens=8192))
    out = {"weight_gb": round(engine.runner.model.weight_bytes() / 1e9, 2),
           "decode": run_batches(engine, batch_sizes, prompt_len, output_len)}
    print("forge decode:", out["decode"], flush=True)
    out["offline"] = run_offline(engine, offline, torch.cuda.synchronize)
    print("forge offline:", out["offline"], flush=True)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def hf_part(cfg: dict, batch_sizes, prompt_len, output_len) -> dict:
    """transformers' own model (its grouped_mm experts), random weights made on the GPU, generate()."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    results = {}
    for bs in [batch_sizes[0]] + list(batch_sizes):  # the first run warms up
        seconds = time_hf_generate(model, config.vocab_size, bs, prompt_len, output_len)
        results[bs] = {"tok_s": round(bs * output_len / seconds, 1)}
        print(f"HF batch {bs}: {results[bs]}", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["layer", "model"], choices=["layer", "model"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-output-len", type=int, default=32, help="HF generate is slow: fewer tokens")
    ap.add_argument("--quick", action="store_true", help="offline: 64 requests of 100-512 tokens")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    bandwidth = measure_copy_bandwidth()
    from forge.ops import cuda

    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
              "shape": "qwen3-30b-a3b", "config": QWEN3_30B_A3B, "moe_kernel_max_pairs": cuda.MOE_KERNEL_MAX_PAIRS}
    if "layer" in args.parts:
        result["layer"] = layer_part(bandwidth)
    if "model" in args.parts:
        n, lo, hi = (64, 100, 512) if args.quick else (256, 100, 1024)
        offline = offline_requests(n, QWEN3_30B_A3B["vocab_size"], lo, hi)
        model_dir = dummy_dir(Path("/tmp/forge-dummy-qwen3-30b-a3b"), QWEN3_30B_A3B)
        forge = forge_part(model_dir, args.batch_sizes, args.prompt_len, args.output_len, offline)
        active = active_weight_bytes(QWEN3_30B_A3B)
        roofline = bandwidth / active  # tok/s at batch 1 if only the active weights' reads took time
        b1 = forge["decode"][args.batch_sizes[0]]["decode_tok_s"]
        result["model"] = {
            "prompt_len": args.prompt_len, "output_len": args.output_len, "forge": forge,
            "active_weight_gb": round(active / 1e9, 3), "active_roofline_tok_s": round(roofline, 1),
            "batch1_fraction_of_active_roofline": round(b1 / roofline, 3),
        }
        if not args.no_hf:
            hf = hf_part(QWEN3_30B_A3B, args.batch_sizes, args.prompt_len, args.hf_output_len)
            result["model"]["hf"] = {"output_len": args.hf_output_len, "decode": hf}
            result["model"]["forge_vs_hf"] = {bs: round(forge["decode"][bs]["tok_s"] / hf[bs]["tok_s"], 2)
                                             for bs in args.batch_sizes}
    path = write_results("moe", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
