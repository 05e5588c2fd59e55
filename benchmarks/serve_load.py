"""Load test of `forge serve`: a bounded number of streaming completions at fixed concurrency levels.

For each concurrency c (with its request count), c workers send streaming /v1/completions requests
(greedy, ignore_eos, so every request generates exactly --max-tokens tokens) until the count is
sent, then the next level starts. Reports request and token throughput, time to first token (TTFT),
inter-token latency (gaps between streamed chunks, ITL) p50/p99, and every error. Stops by itself:
each request has a timeout and the whole run a time limit.

    python benchmarks/serve_load.py --launch                       # starts its own server on 127.0.0.1
    python benchmarks/serve_load.py --url http://127.0.0.1:8000    # an already running one
    python benchmarks/serve_load.py --launch --concurrency 1 8 32 --num-requests 16 32 64 --max-tokens 32

Writes benchmarks/results/serve_load_<tag>.json.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results  # noqa: E402

PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "def quicksort(arr):\n",
    "The three primary colors are", "Write a short poem about the sea.", "In 1492, Columbus",
    "The best way to learn a language is", "Photosynthesis is the process by which",
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, i: int, args, headers: dict) -> dict:
    body = {"model": args.model_name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunk_times, tokens = [], 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": f"stream error: {chunk['error'].get('message')}"}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    chunk_times.append(time.perf_counter())
    except (httpx.HTTPError, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if not chunk_times:
        return {"error": "no tokens streamed"}
    return {"ttft": chunk_times[0] - start, "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
            "latency": end - start, "tokens": tokens}


async def run_level(url: str, concurrency: int, num_requests: int, args, headers: dict) -> dict:
    next_index = 0
    results: list[dict] = []

    async def worker(client):
        nonlocal next_index
        while next_index < num_requests:
            i, next_index = next_index, next_index + 1
            results.append(await one_request(client, url, i, args, headers))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    itl = [gap for r in ok for gap in r["itl"]]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "concurrency": concurrency, "requests": num_requests, "completed": len(ok), "errors": len(errors),
        "error_samples": sorted(set(errors))[:5], "seconds": round(wall, 2),
        "req_per_s": round(len(ok) / wall, 3), "output_tok_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99)),
        "latency_p50_s": round(statistics.median([r["latency"] for r in ok]), 2) if ok else None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "forge", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-waiting", str(max(args.num_requests) + 1)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--device", args.device] + (["--api-key", args.api_key] if args.api_key else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not come up within 180 s")


async def run_all(url: str, args) -> list[dict]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # Warm-up: the first request pays one-time costs (allocations, caches) that are not load.
    await run_level(url, 1, 1, args, headers)
    rows = []
    for concurrency, num_requests in zip(args.concurrency, args.num_requests):
        rows.append(await run_level(url, concurrency, num_requests, args, headers))
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'conc':>5}{'reqs':>6}{'ok':>5}{'err':>5}{'secs':>8}{'req/s':>8}{'tok/s':>8}"
          f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}  (ms)")


def format_row(r: dict) -> str:
    def f(v):
        return "-" if v is None else v
    return (f"{r['concurrency']:>5}{r['requests']:>6}{r['completed']:>5}{r['errors']:>5}{r['seconds']:>8}"
            f"{r['req_per_s']:>8}{r['output_tok_per_s']:>8}{f(r['ttft_p50_ms']):>10}{f(r['ttft_p99_ms']):>10}"
            f"{f(r['itl_p50_ms']):>9}{f(r['itl_p99_ms']):>9}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: --launch one)")
    ap.add_argument("--launch", action="store_true", help="start `forge serve` on a free loopback port for the run")
    ap.add_argument("--model", default=None, help="with --launch: the model to serve (default: the embedded one)")
    ap.add_argument("--device", default="cpu", help="with --launch: cpu or cuda")
    ap.add_argument("--model-name", default="default", help="the `model` field sent (default: 'default')")
    ap.add_argument("--api-key", default=os.environ.get("FORGE_API_KEY"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--num-requests", type=int, nargs="+", default=[16, 32, 64],
                    help="requests per concurrency level (one per --concurrency value)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--time-limit", type=float, default=1800.0, help="stop the whole run after this many seconds")
    ap.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    args = ap.parse_args()
    if len(args.num_requests) != len(args.concurrency):
        ap.error("give one --num-requests value per --concurrency value")

    proc = None
    if args.url is None:
        proc, url = launch_server(args)
    else:
        url = args.url.rstrip("/")
        if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
            ap.error("--url must be a loopback address")
    try:
        print(f"forge serve load test: {url}, max_tokens {args.max_tokens}, streaming, greedy, ignore_eos")
        print(HEADER, flush=True)
        rows = asyncio.run(asyncio.wait_for(run_all(url, args), timeout=args.time_limit))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    tag = args.tag or args.device.split(":")[0]
    path = write_results(f"serve_load_{tag}", {"url": url, "max_tokens": args.max_tokens, "model": args.model
                                               or "default (SmolLM2-135M-Instruct Q4_1)", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
