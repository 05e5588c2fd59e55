"""Decode throughput on the GPU: forge vs HF transformers (eager generate), random weights, bf16.

128-token random prompts, 256 generated tokens (ignore_eos), batch 1/8/32/128, for the SmolLM2-135M
and Llama-3.1-8B shapes. Reports tok/s, the ratio to HF, and batch-1 speed as a fraction of the
bandwidth roofline (weight bytes / 2.94 TB/s). Writes benchmarks/results/decode.{json,csv,png}.

    python benchmarks/decode.py [--shapes smollm2-135m llama-3.1-8b] [--batch-sizes 1 8 32 128]
"""

import argparse
import csv
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, dummy_model_dir, hf_config_dict, run_batches, time_hf_generate, write_results  # noqa: E402

H100_COPY_BANDWIDTH = 2.94e12  # bytes/s, measured on the lent H100


def measure_copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (median of 10)."""
    src = torch.randn(2**30, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / sorted(times[2:])[len(times[2:]) // 2]


def forge_decode(model_dir: Path, batch_sizes, prompt_len, output_len) -> tuple[dict, int]:
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
                                    max_model_len=prompt_len + output_len + 16, max_num_seqs=max(batch_sizes),
                                    max_num_batched_tokens=max(2048, prompt_len * 8)))
    weight_bytes = engine.runner.model.weight_bytes()
    results = run_batches(engine, batch_sizes, prompt_len, output_len)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return results, weight_bytes


def hf_decode(shape: str, batch_sizes, prompt_len, output_len) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = hf_config_dict(shape)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    results = {}
    for bs in [batch_sizes[0]] + list(batch_sizes):  # the first run warms up
        results[bs] = {"tok_s": bs * output_len / time_hf_generate(model, config.vocab_size, bs, prompt_len, output_len)}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5))
    axes = [axes] if len(shapes) == 1 else axes
    for ax, shape in zip(axes, shapes):
        rs = [r for r in rows if r["shape"] == shape]
        bss = [r["batch"] for r in rs]
        ax.plot(bss, [r["forge_tok_s"] for r in rs], "o-", label="forge")
        if all(r.get("hf_tok_s") for r in rs):
            ax.plot(bss, [r["hf_tok_s"] for r in rs], "s--", label="HF transformers (eager)")
        roof = rs[0]["roofline_tok_s"]
        ax.plot(bss, [roof * b for b in bss], ":", color="gray", label="bandwidth roofline (weights only)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("generated tok/s")
        ax.set_title(f"{shape} decode, bf16")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.1-8b"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    args = ap.parse_args()
    bandwidth = measure_copy_bandwidth()
    rows = []
    for shape in args.shapes:
        model_dir = dummy_model_dir(shape)
        forge_res, weight_bytes = forge_decode(model_dir, args.batch_sizes, args.prompt_len, args.output_len)
        hf_res = {} if args.no_hf else hf_decode(shape, args.batch_sizes, args.prompt_len, args.output_len)
        roofline = bandwidth / weight_bytes
        for bs in args.batch_sizes:
            f = forge_res[bs]
            h = hf_res.get(bs, {}).get("tok_s")
            rows.append({
                "shape": shape, "batch": bs, "forge_tok_s": round(f["tok_s"], 1),
                "forge_decode_tok_s": round(f["decode_tok_s"], 1), "hf_tok_s": round(h, 1) if h else None,
                "ratio_vs_hf": round(f["tok_s"] / h, 2) if h else None,
                "roofline_tok_s": round(roofline, 1),
                "fraction_of_roofline": round(f["decode_tok_s"] / roofline, 3) if bs == 1 else None,
                "weight_gb": round(weight_bytes / 1e9, 3),
            })
    device = torch.cuda.get_device_name()
    write_results("decode", {"device": device, "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
                             "h100_copy_bandwidth_tb_s": H100_COPY_BANDWIDTH / 1e12, "prompt_len": args.prompt_len,
                             "output_len": args.output_len, "rows": rows})
    with open(RESULTS / "decode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        plot(rows, RESULTS / "decode.png")
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"decode throughput on {device} (prompt {args.prompt_len}, output {args.output_len}, bf16); "
          f"measured copy bandwidth {bandwidth / 1e12:.2f} TB/s = the roofline's ceiling")
    print(f"{'shape':<14}{'batch':>6}{'forge tok/s':>13}{'decode tok/s':>14}{'HF tok/s':>10}{'x HF':>7}{'roofline':>10}")
    for r in rows:
        frac = f"{r['fraction_of_roofline']:.0%}" if r["fraction_of_roofline"] is not None else ""
        print(f"{r['shape']:<14}{r['batch']:>6}{r['forge_tok_s']:>13}{r['forge_decode_tok_s']:>14}"
              f"{r['hf_tok_s'] or '-':>10}{r['ratio_vs_hf'] or '-':>7}{frac:>10}")


if __name__ == "__main__":
    main()
