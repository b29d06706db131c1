#!/usr/bin/env bash
# The SDXL GPU benchmark suite: one H100 / H200, under 8 minutes, random-weight SDXL architecture (no download).
#
#   benchmarks/gpu_suite.sh [OUT]          # GPU: the paper setup
#   benchmarks/gpu_suite.sh --cpu [OUT]    # tiny model on CPU, no compile: the flow in seconds (numbers mean nothing)
#
# 1. CD at the paper setup (batch 16, 1024 px, LoRA r 64, N = 100, w = 9, DDIM, bf16, gradient checkpointing),
#    eager: 3 warm-up + 10 timed iterations; FLOPs counted phase by phase on the same modules (model and
#    hardware FLOPs, MFU and HFU); one full Direct CD iteration (mask_mode=full, ~94.6 teacher steps, ~1 min),
#    and the Direct CD estimate from the measured CFG teacher step x E[depth], which also gives the
#    reference-generation throughput of the UNet (B images per N teacher steps).
# 2. CD with torch.compile: 3 warm-up iterations (the compile) + 10 timed.
# Goal to report against: a CD iteration in <= 1.6 s on one H100 under 40 GiB (a diffusers-style script: 3.15 s).
# Each part's JSON lands in OUT/<part>/metrics.json; OUT/summary.md collects them with wall times.
set -euo pipefail

DEVICE_ARGS=(--no-tiny)
COMPILE_ARGS=(--compile)
if [[ "${1:-}" == "--cpu" ]]; then
    DEVICE_ARGS=(--tiny --batch-size 2 --resolution 32 --num-steps 4 --lora-rank 4 --iters 1 --warmup 0)
    COMPILE_ARGS=()  # the flow only: tracing the UNet takes minutes on CPU (--compile --compile-backend eager to try)
    shift
fi
OUT="${1:-results/gpu_suite}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"

run_part() {  # name, time limit in seconds, then benchmark arguments
    local name="$1" limit="$2"; shift 2
    local t0; t0=$(date +%s)
    timeout "$limit" "$PY" -m benchmarks.sdxl_step "${DEVICE_ARGS[@]}" --out "$OUT/$name" "$@" \
        || echo "$name: stopped (exit $?; time limit ${limit} s)" | tee -a "$OUT/notes.txt"
    echo "$name $(( $(date +%s) - t0 ))" >> "$OUT/wall_seconds.txt"
}

: > "$OUT/wall_seconds.txt"
: > "$OUT/notes.txt"
# limits keep the suite under 8 minutes even if compiling takes longer than expected
run_part eager "${EAGER_LIMIT:-210}" --methods cd direct_cd --direct-cd-estimate --direct-cd-iterations 1
run_part compile "${COMPILE_LIMIT:-250}" --methods cd ${COMPILE_ARGS[@]+"${COMPILE_ARGS[@]}"}

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

from benchmarks.sdxl_step import format_table

out = Path(sys.argv[1])
rows, extra = [], {}
for part in ("eager", "compile"):
    path = out / part / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    rows += data.get("results", [])
    extra.update(data.get("direct_cd_estimate", {}))
walls = dict(line.split() for line in (out / "wall_seconds.txt").read_text().splitlines() if line.strip())
lines = [format_table(rows), ""]
lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in extra.items()]
lines += [f"- wall seconds, {k}: {v}" for k, v in walls.items()]
lines += [f"- {note}" for note in (out / "notes.txt").read_text().splitlines() if note.strip()]
lines.append(f"- total wall seconds: {sum(int(v) for v in walls.values())}")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
