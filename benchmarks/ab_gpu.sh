#!/usr/bin/env bash
# Same-run A/B of two source trees on the GPU machine (e.g. the commit before a refactor vs now):
#   bash benchmarks/ab_gpu.sh OLD_TREE [NEW_TREE=.]
# Runs, alternating old/new/new/old, the decode benchmark (8B shape batch 1 and 128, 135M shape
# batch 1; no HF baseline) and the offline-throughput benchmark (8B shape, 256 requests, no HF,
# no prefix workload), then prints new/old ratios from each tree's results JSON (copied to $OUT).
set -uo pipefail
OLD="$(cd "$1" && pwd)"; NEW="$(cd "${2:-.}" && pwd)"; OUT="${OUT:-/tmp/forge_ab}"; mkdir -p "$OUT"
run() {  # tree label
    (cd "$1" && PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" python3 benchmarks/decode.py --no-hf \
        --shapes smollm2-135m llama-3.1-8b --batch-sizes 1 128 --output-len 256 >/dev/null &&
     cp benchmarks/results/decode.json "$OUT/decode_$2.json" &&
     PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" python3 benchmarks/throughput.py --hf-batch-sizes --skip-prefix >/dev/null &&
     cp benchmarks/results/throughput.json "$OUT/throughput_$2.json") || echo "run $2 failed"
}
run "$OLD" old1; run "$NEW" new1; run "$NEW" new2; run "$OLD" old2
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(tag):
    d = json.loads((out / f"decode_{tag}.json").read_text())
    r = {(x["shape"], x["batch"]): x["forge_decode_tok_s"] for x in d["rows"]}
    t = json.loads((out / f"throughput_{tag}.json").read_text())
    r[("offline", 256)] = t["forge"]["output_tok_s"]
    return r
runs = {tag: rows(tag) for tag in ("old1", "new1", "new2", "old2")}
print(f"{'case':<26}{'old tok/s':>12}{'new tok/s':>12}{'new/old':>9}")
for key in runs["old1"]:
    old = [runs[t][key] for t in ("old1", "old2") if runs[t].get(key)]
    new = [runs[t][key] for t in ("new1", "new2") if runs[t].get(key)]
    if old and new:
        o, n = sum(old) / len(old), sum(new) / len(new)
        print(f"{str(key):<26}{o:>12.1f}{n:>12.1f}{n / o:>9.3f}")
PY
