"""Tensor-parallel decode throughput: TP = 1, 2, 4 (as many as there are GPUs), random weights, bf16.

Shapes: Llama-3.1-8B, and Llama-3.1-70B's layer shape (hidden 8192, 64 heads, 8 KV heads, MLP 28672,
vocabulary 128256) cut to --layers-70b layers so that TP=1 still fits one GPU. 128-token random
prompts, --output-len generated tokens (ignore_eos), batch 1 and 32, CUDA graphs on (the NCCL
all-reduces are captured in them).

Scaling efficiency = decode tok/s at TP=N / (N x decode tok/s at TP=1), same shape and batch.
Writes benchmarks/results/tp_decode.json (after every configuration, so a cut-off run keeps what it has).

    python benchmarks/tp_decode.py [--tp 1 2 4] [--shapes llama-3.1-8b llama-3.1-70b-8l] [--batch-sizes 1 32]
"""

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import dummy_model_dir, run_batches, write_results  # noqa: E402

LLAMA_70B_LAYER = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       head_dim=128)


def model_dir(shape: str, layers_70b: int) -> Path:
    root = Path(tempfile.gettempdir()) / "forge-tp-bench" / shape
    if shape == "llama-3.1-8b":
        return dummy_model_dir("llama-3.1-8b", root=root)
    if shape.startswith("llama-3.1-70b"):
        return dummy_model_dir("llama-3.1-8b", root=root, num_hidden_layers=layers_70b, **LLAMA_70B_LAYER)
    raise ValueError(f"unknown shape {shape}")


def make_engine(path: Path, tp: int, batch_sizes, prompt_len: int, output_len: int, eager: bool):
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(path), load_format="dummy", device="cuda", dtype="bfloat16",
                                  tensor_parallel_size=tp, max_model_len=prompt_len + output_len + 16,
                                  max_num_seqs=max(batch_sizes), max_num_batched_tokens=max(2048, prompt_len * 8),
                                  enforce_eager=eager))


def bench_one(shape: str, path: Path, tp: int, args) -> dict:
    engine, eager, error = None, False, None
    t0 = time.perf_counter()
    try:
        engine = make_engine(path, tp, args.batch_sizes, args.prompt_len, args.output_len, eager=args.eager)
    except Exception as e:  # noqa: BLE001 - retry without CUDA graphs, and say so
        if args.eager:
            raise
        traceback.print_exc()
        error = f"with CUDA graphs: {type(e).__name__}: {e}"
        gc.collect()
        torch.cuda.empty_cache()
        eager = True
        engine = make_engine(path, tp, args.batch_sizes, args.prompt_len, args.output_len, eager=True)
    startup = time.perf_counter() - t0
    try:
        res = run_batches(engine, args.batch_sizes, args.prompt_len, args.output_len)
        info = {"weight_gb_per_rank": round(engine.runner.model.weight_bytes() / 1e9, 3),
                "kv_blocks": engine.runner.num_kv_blocks, "cuda_graphs": engine.runner.graphs is not None,
                "startup_s": round(startup, 1), "graph_error": error, "eager_fallback": eager}
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return {"results": res, "info": info}


def _preflight_rank(rank: int, world_size: int, port: int) -> None:
    """NCCL through forge's group: eager and CUDA-graph-captured all-reduce / all-gather, then teardown."""
    from forge.distributed.parallel_state import destroy_tp_group, init_tp_group

    group = init_tp_group(rank, world_size, port, f"cuda:{rank}")
    x = torch.full((4, 1024), float(rank + 1), device=f"cuda:{rank}", dtype=torch.bfloat16)
    total = world_size * (world_size + 1) / 2

    def body():
        y = group.all_reduce(x * 1)
        return y, group.all_gather(x[:, :8] * 1, dim=-1)

    y, g = body()  # warm-up (connections are set up outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gy, gg = body()
    for step in range(3):
        x.fill_(float((rank + 1) * (step + 2)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.all(gy == total * (step + 2)), (rank, step, gy[0, 0].item())
        assert gg.shape == (4, 8 * world_size) and gg[0, -1].item() == world_size * (step + 2)
    t = time.perf_counter()
    for _ in range(100):
        graph.replay()
    torch.cuda.synchronize()
    if rank == 0:
        print(f"preflight: {world_size} ranks, graph-captured all-reduce + all-gather ok, "
              f"{(time.perf_counter() - t) * 1e4:.1f} us per replay", flush=True)
    group.broadcast_object("bye")
    del graph
    destroy_tp_group()


def preflight(world_size: int) -> None:
    from forge.distributed.parallel_state import disable_multicast, free_port

    disable_multicast()
    torch.multiprocessing.spawn(_preflight_rank, args=(world_size, free_port()), nprocs=world_size)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "llama-3.1-70b-8l"])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--layers-70b", type=int, default=8)
    ap.add_argument("--preflight", action="store_true", help="only check NCCL collectives in CUDA graphs")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (enforce_eager)")
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    if args.preflight:
        preflight(min(gpus, max(args.tp)))
        return
    tps = [t for t in args.tp if t <= gpus]
    skipped = [t for t in args.tp if t > gpus]
    device = torch.cuda.get_device_name()
    rows, configs = [], {}
    payload = {"device": f"{gpus}x {device}", "prompt_len": args.prompt_len, "output_len": args.output_len,
               "dtype": "bfloat16", "tp_not_run": skipped, "env": {k: os.environ.get(k) for k in
               ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
               "rows": rows, "configs": configs}
    for shape in args.shapes:
        path = model_dir(shape, args.layers_70b)
        base = {}
        for tp in tps:
            key = f"{shape}/tp{tp}"
            try:
                out = bench_one(shape, path, tp, args)
            except Exception as e:  # noqa: BLE001 - record and go on with the next configuration
                traceback.print_exc()
                configs[key] = {"error": f"{type(e).__name__}: {e}"}
                write_results("tp_decode", payload)
                continue
            configs[key] = out["info"]
            for bs, r in out["results"].items():
                if tp == 1:
                    base[bs] = r["decode_tok_s"]
                speedup = r["decode_tok_s"] / base[bs] if bs in base else None
                rows.append({
                    "shape": shape, "tp": tp, "batch": bs, "tok_s": round(r["tok_s"], 1),
                    "decode_tok_s": round(r["decode_tok_s"], 1), "ms_per_step": round(r["ms_per_step"], 3),
                    "speedup_vs_tp1": round(speedup, 3) if speedup else None,
                    "scaling_efficiency": round(speedup / tp, 3) if speedup else None,
                })
            write_results("tp_decode", payload)
            print(f"{key}: {out['info']} {out['results']}", flush=True)
    print(f"tensor-parallel decode on {gpus}x {device} (prompt {args.prompt_len}, output {args.output_len}, bf16)")
    print(f"{'shape':<18}{'tp':>3}{'batch':>6}{'tok/s':>10}{'decode tok/s':>14}{'ms/step':>9}{'speedup':>9}{'eff':>7}")
    for r in rows:
        sp = f"{r['speedup_vs_tp1']:.2f}" if r["speedup_vs_tp1"] else "-"
        eff = f"{r['scaling_efficiency']:.0%}" if r["scaling_efficiency"] else "-"
        print(f"{r['shape']:<18}{r['tp']:>3}{r['batch']:>6}{r['tok_s']:>10}{r['decode_tok_s']:>14}"
              f"{r['ms_per_step']:>9}{sp:>9}{eff:>7}")
    if skipped:
        print(f"not run (too few GPUs): TP={skipped}")


if __name__ == "__main__":
    main()
