"""A dense family on the GPU: a Qwen3-8B-shaped model with random weights, forge vs HF transformers, bf16.

Decode batch 1 and 32 (128-token random prompts, ignore_eos) and offline throughput (256 requests,
prompt and output lengths uniform in [100, 1024] — 64 of 100-512 with --quick), forge (dummy weights)
vs transformers' Qwen3ForCausalLM (random init, generate) in the same run; batch-1 decode as a fraction
of the weight-read roofline (weight bytes / measured copy bandwidth). The MoE shape is benchmarks/moe.py.

    python benchmarks/families.py [--quick] [--no-hf]
    python benchmarks/families.py --shape tiny --device cpu --quick   # a seconds-long check of the script
Writes benchmarks/results/families.json (--shape tiny: families_tiny.json).
"""

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import offline_requests, run_batches, run_offline, time_hf_generate, write_results  # noqa: E402
from benchmarks.moe import H200_COPY_BANDWIDTH, dummy_dir, measure_copy_bandwidth  # noqa: E402

# Qwen3-8B (config.json of Qwen/Qwen3-8B)
QWEN3_8B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
    intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    attention_bias=False, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
    tie_word_embeddings=False, use_sliding_window=False, sliding_window=None, max_window_layers=36,
    hidden_act="silu", bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
)
SHAPES = {
    "qwen3-8b": QWEN3_8B,
    # the same family, small enough for the CPU (checks the script, not the speed)
    "tiny": {**QWEN3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_window_layers": 2},
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read_bytes_per_token(c: dict, weight_bytes: int, dtype_bytes: int = 2) -> int:
    """What one batch-1 decode step reads: every weight but the embedding table, of which one row."""
    return weight_bytes - dtype_bytes * (c["vocab_size"] - 1) * c["hidden_size"]


def forge_part(model_dir: Path, device: str, dtype: str, batch_sizes, prompt_len, output_len, offline) -> dict:
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", device=device, dtype=dtype,
                                    max_model_len=2048 + 16, max_num_seqs=256, max_num_batched_tokens=8192))
    out = {"weight_bytes": engine.runner.model.weight_bytes(),
           "decode": run_batches(engine, batch_sizes, prompt_len, output_len)}
    print("forge decode:", out["decode"], flush=True)
    out["offline"] = run_offline(engine, offline, lambda: sync(device))
    print("forge offline:", out["offline"], flush=True)
    del engine
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def hf_part(cfg: dict, device: str, dtype: torch.dtype, batch_sizes, prompt_len, output_len) -> dict:
    """transformers' Qwen3ForCausalLM, random weights made on the device, generate() (greedy, no EOS stop)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype).eval()

    results = {}
    for bs in batch_sizes:
        time_hf_generate(model, config.vocab_size, bs, prompt_len, 8, device)  # warm-up
        seconds = time_hf_generate(model, config.vocab_size, bs, prompt_len, output_len, device)
        results[bs] = {"tok_s": round(bs * output_len / seconds, 1)}
        print(f"HF batch {bs}: {results[bs]}", flush=True)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-8b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda", help="cpu: only to check the script (--shape tiny)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="offline: 64 requests of 100-512 tokens")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if not cuda:  # run_batches synchronises CUDA; nothing to wait for on the CPU
        torch.cuda.synchronize = lambda device=None: None
    bandwidth = measure_copy_bandwidth() if cuda else H200_COPY_BANDWIDTH
    dtype = "bfloat16" if cuda else "float32"
    cfg = SHAPES[args.shape]
    n, lo, hi = (64, 100, 512) if args.quick else (256, 100, 1024)
    offline = offline_requests(n, cfg["vocab_size"], lo, hi)
    model_dir = dummy_dir(Path(f"/tmp/forge-dummy-{args.shape}"), cfg)
    forge = forge_part(model_dir, args.device, dtype, args.batch_sizes, args.prompt_len, args.output_len, offline)
    weight_bytes = forge.pop("weight_bytes")
    read_bytes = read_bytes_per_token(cfg, weight_bytes, 2 if cuda else 4)
    b1 = forge["decode"][args.batch_sizes[0]]["decode_tok_s"]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": dtype,
        "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3), "shape": args.shape, "config": cfg,
        "prompt_len": args.prompt_len, "output_len": args.output_len, "forge": forge,
        "weight_gb": round(weight_bytes / 1e9, 3), "roofline_tok_s": round(bandwidth / weight_bytes, 1),
        "batch1_fraction_of_roofline": round(b1 * weight_bytes / bandwidth, 3),
        # the embedding table is read one row a token: the stricter roofline
        "read_gb_per_token": round(read_bytes / 1e9, 3), "read_roofline_tok_s": round(bandwidth / read_bytes, 1),
        "batch1_fraction_of_read_roofline": round(b1 * read_bytes / bandwidth, 3),
    }
    if not args.no_hf:
        hf = hf_part(cfg, args.device, getattr(torch, dtype), args.batch_sizes, args.prompt_len, args.output_len)
        result["hf"] = {"decode": hf}
        result["forge_vs_hf"] = {bs: round(forge["decode"][bs]["tok_s"] / hf[bs]["tok_s"], 2) for bs in args.batch_sizes}
    path = write_results("families" if args.shape == "qwen3-8b" else f"families_{args.shape}", result)
    print(f"{args.shape} on {result['device']}: batch-1 decode {b1:.1f} tok/s = "
          f"{result['batch1_fraction_of_roofline']:.0%} of the weight roofline ({result['roofline_tok_s']} tok/s); "
          f"forge vs HF {result.get('forge_vs_hf')}; offline {forge['offline']['output_tok_s']} output tok/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
