"""Decode throughput on the GPU: forge vs HF transformers (eager generate), random weights, bf16;
or, with --quantization, forge's weight formats against each other.

Default: 128-token random prompts, 256 generated tokens (ignore_eos), batch 1/8/32/128, for the
SmolLM2-135M and Llama-3.1-8B shapes. Reports tok/s, the ratio to HF, and batch-1 speed as a fraction
of the bandwidth roofline (measured copy bandwidth / weight bytes). Writes
benchmarks/results/decode.{json,csv,png}.

    python benchmarks/decode.py [--shapes smollm2-135m llama-3.1-8b] [--batch-sizes 1 8 32 128]

--quantization bf16 fp8 int4 (any of them; bf16 = quantization "none" in bfloat16, fp8 = e4m3
weights quantized at load, int4 = group-128 weight-only; dummy weights, quantized at load like real
ones): one forge engine per format, shape llama-3.1-8b unless --shapes, no HF run, output length 128
unless --output-len (the 8B sweep of 3 formats x 4 batch sizes then takes well under 6 minutes of
GPU time: one load + CUDA-graph capture and ~10 s of decoding per format). Per format and batch:
tok/s (prompt included), decode-only tok/s (after every sequence has its first token), us per decode
step (1e6 * batch / decode tok/s), weight GB (the model's own count of its quantized bytes), the
format's weight-read ceiling (copy bandwidth / weight bytes = decode steps/s, x batch for tok/s) and
the fraction of it reached (decode tok/s / (batch x ceiling)), and the ratios to the bf16 run of the
same invocation at that batch. --kv-cache-dtype fp8 adds a second set of runs, every format again
with the FP8 KV cache (rows with kv_cache_dtype "fp8"; their ratios are to bf16 with the bf16 cache,
and `x same, bf16 KV` to the same format with the bf16 cache). Rows merge into
benchmarks/results/decode_quant.json by (shape, format, kv cache, batch), so a later invocation
(e.g. the 70B shape) keeps the earlier one's rows; decode.json is not touched.

    python benchmarks/decode.py --quantization bf16 fp8 int4 [--kv-cache-dtype fp8]
    python benchmarks/decode.py --shapes llama-3.1-70b --quantization int4 --batch-sizes 1 --no-hf

--pdl off on: every forge run twice in the same invocation, programmatic dependent launch (issue 18,
FORGE_PDL) off then on (each run builds its engine and captures its graphs under that setting); rows carry
"pdl" and decode_ratio_vs_pdl_off (the same run's decode tok/s over the PDL-off run's: > 1 is faster). Without
--pdl the runs take FORGE_PDL's setting (default off), recorded in "pdl".

    python benchmarks/decode.py --shapes smollm2-135m llama-3.1-8b --batch-sizes 1 8 --no-hf --pdl off on
    python benchmarks/decode.py --quantization bf16 int4 --batch-sizes 1 8 --pdl off on
"""

import argparse
import csv
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    RESULTS,
    SHAPES,
    WEIGHT_FORMATS,
    dummy_model_dir,
    format_engine_kwargs,
    hf_config_dict,
    run_batches,
    time_hf_generate,
    write_results,
)

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




def set_pdl_mode(mode: str | None) -> str:
    """Programmatic dependent launch for the engines built from now on: "on" / "off", or None for FORGE_PDL's
    setting; returns the setting in force ("on" / "off")."""
    from forge.kernels import compiler

    if mode is not None and compiler.set_pdl(mode == "on") != (mode == "on"):
        raise SystemExit("--pdl on: programmatic dependent launch cannot run here (sm_90+ and CUDA 12.3+; see the log)")
    return "on" if compiler.pdl_enabled() else "off"


def add_pdl_ratios(rows: list[dict], key_fields: tuple[str, ...], tok_s_field: str) -> None:
    """decode_ratio_vs_pdl_off on every row: its decode tok/s over that of the row with the same key_fields and
    PDL off (None where the invocation has no such row)."""
    off = {tuple(r[k] for k in key_fields): r[tok_s_field] for r in rows if r["pdl"] == "off"}
    for r in rows:
        base = off.get(tuple(r[k] for k in key_fields))
        r["decode_ratio_vs_pdl_off"] = round(r[tok_s_field] / base, 3) if base else None


def forge_decode(model_dir: Path, batch_sizes, prompt_len, output_len, info: dict | None = None,
                 **engine_kwargs) -> tuple[dict, int]:
    """run_batches on a fresh engine (engine_kwargs: quantization, kv_cache_dtype, ...); fills `info`
    with the load time and KV pool size."""
    import time

    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    start = time.perf_counter()
    engine = LLMEngine(EngineConfig(**{**dict(
        model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
        max_model_len=prompt_len + output_len + 16, max_num_seqs=max(batch_sizes),
        max_num_batched_tokens=max(2048, prompt_len * 8)), **engine_kwargs}))
    weight_bytes = engine.runner.model.weight_bytes()
    if info is not None:
        info.update(load_seconds=round(time.perf_counter() - start, 1), kv_blocks=engine.runner.num_kv_blocks,
                    kv_dtype=str(engine.runner.kv_dtype).removeprefix("torch."))
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
        for pdl in dict.fromkeys(r["pdl"] for r in rs):
            fr = [r for r in rs if r["pdl"] == pdl]
            ax.plot([r["batch"] for r in fr], [r["forge_tok_s"] for r in fr], "o-", label=f"forge (PDL {pdl})")
        rs = [r for r in rs if r["pdl"] == rs[0]["pdl"]]
        bss = [r["batch"] for r in rs]
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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                    help="default: smollm2-135m llama-3.1-8b (with --quantization: llama-3.1-8b)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, help="generated tokens per sequence (default 256; with --quantization 128)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline (always skipped "
                                                         "with --quantization)")
    ap.add_argument("--quantization", nargs="+", choices=list(WEIGHT_FORMATS),
                    help="compare these weight formats (forge only) -> results/decode_quant.json")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="fp8: also run every format with the FP8 KV cache (needs --quantization)")
    ap.add_argument("--no-merge", action="store_true",
                    help="with --quantization: drop the rows of earlier invocations from decode_quant.json")
    ap.add_argument("--pdl", nargs="+", choices=["off", "on"],
                    help="run forge with programmatic dependent launch off and/or on, in this order "
                         "(default: FORGE_PDL's setting)")
    args = ap.parse_args(argv)
    if args.kv_cache_dtype != "auto" and not args.quantization:
        ap.error("--kv-cache-dtype needs --quantization (e.g. --quantization bf16 fp8 --kv-cache-dtype fp8)")
    if args.quantization:
        args.quantization = list(dict.fromkeys(args.quantization))  # once each, in the given order
    args.pdl = list(dict.fromkeys(args.pdl)) if args.pdl else [None]
    args.shapes = args.shapes or (["llama-3.1-8b"] if args.quantization else ["smollm2-135m", "llama-3.1-8b"])
    args.output_len = args.output_len or (128 if args.quantization else 256)
    return args


def quant_runs(args) -> list[tuple[str, str]]:
    """(format, kv_cache_dtype) pairs in run order: every format with the bf16 cache, then (--kv-cache-dtype
    fp8) every format again with the FP8 cache."""
    kvs = ["auto"] + (["fp8"] if args.kv_cache_dtype == "fp8" else [])
    return [(fmt, kv) for kv in kvs for fmt in args.quantization]


def quant_rows(shape: str, results: dict, bandwidth: float, batch_sizes, pdl: str = "off") -> list[dict]:
    """results: {(format, kv): (run_batches result, weight_bytes, info)} of one PDL setting -> one row per run
    and batch."""
    rows = []
    for (fmt, kv), (res, weight_bytes, info) in results.items():
        ceiling = bandwidth / weight_bytes  # decode steps/s if a step cost only reading the weights once
        for bs in batch_sizes:
            r = res[bs]
            row = {"shape": shape, "format": fmt, "kv_cache_dtype": kv, "pdl": pdl, "batch": bs,
                   "tok_s": round(r["tok_s"], 1),
                   "decode_tok_s": round(r["decode_tok_s"], 1),
                   "us_per_step": round(1e6 * bs / r["decode_tok_s"], 1), "weight_gb": round(weight_bytes / 1e9, 3),
                   "ceiling_tok_s": round(ceiling * bs, 1),
                   "fraction_of_ceiling": round(r["decode_tok_s"] / (ceiling * bs), 3),
                   "ratio_vs_bf16": None, "decode_ratio_vs_bf16": None, "decode_ratio_vs_same_format_bf16_kv": None,
                   **info}
            for key, base_key in (("", ("bf16", "auto")), ("same", (fmt, "auto"))):
                base = results.get(base_key)
                if base is None or (fmt, kv) == base_key:
                    continue
                b = base[0][bs]
                if key:
                    row["decode_ratio_vs_same_format_bf16_kv"] = round(r["decode_tok_s"] / b["decode_tok_s"], 2)
                else:
                    row["ratio_vs_bf16"] = round(r["tok_s"] / b["tok_s"], 2)
                    row["decode_ratio_vs_bf16"] = round(r["decode_tok_s"] / b["decode_tok_s"], 2)
            rows.append(row)
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Earlier invocations' rows, less those this one measured again (same shape, format, KV cache, PDL, batch)."""
    def key(r):
        return r["shape"], r["format"], r["kv_cache_dtype"], r.get("pdl", "off"), r["batch"]

    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def quant_main(args, bandwidth: float) -> None:
    import json
    import time

    device = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = []
    for shape in args.shapes:
        model_dir = dummy_model_dir(shape)
        for mode in args.pdl:
            pdl = set_pdl_mode(mode)
            results = {}
            for fmt, kv in quant_runs(args):
                info = {}
                start = time.perf_counter()
                res, weight_bytes = forge_decode(model_dir, args.batch_sizes, args.prompt_len, args.output_len, info,
                                                 **format_engine_kwargs(fmt + ("+fp8kv" if kv == "fp8" else "")))
                info["run_seconds"] = round(time.perf_counter() - start, 1)
                results[(fmt, kv)] = (res, weight_bytes, info)
                print(f"{shape} {fmt} (KV {kv}, PDL {pdl}): {weight_bytes / 1e9:.2f} GB, loaded in "
                      f"{info['load_seconds']} s, {info['run_seconds']} s in all", flush=True)
            rows += [{**r, "timestamp": stamp, "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3)}
                     for r in quant_rows(shape, results, bandwidth, args.batch_sizes, pdl)]
    add_pdl_ratios(rows, ("shape", "format", "kv_cache_dtype", "batch"), "decode_tok_s")
    path = RESULTS / "decode_quant.json"
    old = [] if args.no_merge or not path.exists() else json.loads(path.read_text()).get("rows", [])
    write_results("decode_quant", {"device": device, "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
                                   "prompt_len": args.prompt_len, "output_len": args.output_len,
                                   "rows": merge_rows(old, rows)})
    print(f"\ndecode by weight format on {device} (prompt {args.prompt_len}, output {args.output_len}, greedy, "
          f"dummy weights); measured copy bandwidth {bandwidth / 1e12:.2f} TB/s; ceiling = bandwidth / weight bytes")
    print_quant_table(rows)


def print_quant_table(rows: list[dict]) -> None:
    print(f"{'shape':<14}{'format':<7}{'KV':<6}{'PDL':<5}{'batch':>6}{'tok/s':>10}{'decode tok/s':>14}{'us/step':>9}"
          f"{'weight GB':>10}{'ceiling':>10}{'of ceil':>8}{'x bf16':>8}{'x bf16 dec':>11}{'x same bf16 KV':>15}"
          f"{'x PDL off':>10}")
    for r in rows:
        kv = "fp8" if r["kv_cache_dtype"] == "fp8" else "bf16"

        def ratio(x):
            return f"{x:.2f}" if x is not None else "-"

        print(f"{r['shape']:<14}{r['format']:<7}{kv:<6}{r.get('pdl', 'off'):<5}{r['batch']:>6}{r['tok_s']:>10}"
              f"{r['decode_tok_s']:>14}{r['us_per_step']:>9}{r['weight_gb']:>10}{r['ceiling_tok_s']:>10}"
              f"{r['fraction_of_ceiling']:>8.0%}{ratio(r['ratio_vs_bf16']):>8}{ratio(r['decode_ratio_vs_bf16']):>11}"
              f"{ratio(r['decode_ratio_vs_same_format_bf16_kv']):>15}{ratio(r.get('decode_ratio_vs_pdl_off')):>10}")


def main(argv=None):
    args = parse_args(argv)
    bandwidth = measure_copy_bandwidth()
    if args.quantization:
        return quant_main(args, bandwidth)
    rows = []
    for shape in args.shapes:
        model_dir = dummy_model_dir(shape)
        runs = []
        for mode in args.pdl:
            pdl = set_pdl_mode(mode)
            runs.append((pdl, *forge_decode(model_dir, args.batch_sizes, args.prompt_len, args.output_len)))
        hf_res = {} if args.no_hf else hf_decode(shape, args.batch_sizes, args.prompt_len, args.output_len)
        for pdl, forge_res, weight_bytes in runs:
            roofline = bandwidth / weight_bytes
            for bs in args.batch_sizes:
                f = forge_res[bs]
                h = hf_res.get(bs, {}).get("tok_s")
                rows.append({
                    "shape": shape, "pdl": pdl, "batch": bs, "forge_tok_s": round(f["tok_s"], 1),
                    "forge_decode_tok_s": round(f["decode_tok_s"], 1),
                    "forge_us_per_step": round(1e6 * bs / f["decode_tok_s"], 1), "hf_tok_s": round(h, 1) if h else None,
                    "ratio_vs_hf": round(f["tok_s"] / h, 2) if h else None,
                    "roofline_tok_s": round(roofline, 1),
                    "fraction_of_roofline": round(f["decode_tok_s"] / roofline, 3) if bs == 1 else None,
                    "weight_gb": round(weight_bytes / 1e9, 3),
                })
    add_pdl_ratios(rows, ("shape", "batch"), "forge_decode_tok_s")
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
    print(f"{'shape':<14}{'PDL':<5}{'batch':>6}{'forge tok/s':>13}{'decode tok/s':>14}{'us/step':>9}{'HF tok/s':>10}"
          f"{'x HF':>7}{'roofline':>10}{'x PDL off':>10}")
    for r in rows:
        frac = f"{r['fraction_of_roofline']:.0%}" if r["fraction_of_roofline"] is not None else ""
        print(f"{r['shape']:<14}{r['pdl']:<5}{r['batch']:>6}{r['forge_tok_s']:>13}{r['forge_decode_tok_s']:>14}"
              f"{r['forge_us_per_step']:>9}{r['hf_tok_s'] or '-':>10}{r['ratio_vs_hf'] or '-':>7}{frac:>10}"
              f"{r['decode_ratio_vs_pdl_off'] or '-':>10}")


if __name__ == "__main__":
    main()
