#!/usr/bin/env bash
# The GPU check, in one command for a lent GPU machine (one GPU, no package registry); it fits
# 10 minutes of one H200, wheels and the random 3B-shape model included.
#
#   here:   make install && bash experiments/gpu_wheels.sh      # fills .whl/ (git-excluded)
#   there:  bash experiments/gpu_check.sh                        # carry .whl; results in $OUT
#   dry:    GPU_CHECK_DRY=1 bash experiments/gpu_check.sh        # prints the commands, runs none
#
# Parts, in this order, each under its own time limit (one failing or slow part does not lose
# the others; the whole stays inside GPU_CHECK_BUDGET_S, default 570 s):
#   wheels      install .whl/*.whl into /tmp/site (the machine's python3 has torch and CUDA)
#   plan        python -m medloc.engine_plan for the bench's configuration at each engine: the
#               predicted per-GPU peak, set beside the bench's measured one in the summary
#   nccl        one short GRPO run (tiny model, ZeRO-2, 2 steps and the evaluation) under
#               torchrun with MEDLOC_FORCE_COLLECTIVES=1: the one-process shortcut of the
#               collectives is off, so every collective really goes through NCCL (NCCL_DEBUG=INFO
#               lines in the log say it started)
#   attention   our sampler and training forward under sdpa and under flash_attention_2, same seed
#               and prompts (experiments.bench_gpu --compare-attn); skipped with a line when
#               flash-attn does not import
#   bench_zero2 experiments.bench_gpu on the 3B shape at ZeRO-2 with every floor (the floors other
#               than the optimizer's do not depend on the engine: they run once, here)
#   bench_zero0, bench_zero3   the same at ZeRO-0 and ZeRO-3, with the optimizer floor only
# Everything lands in $OUT (default runs/gpu_check): <part>.log, bench_<engine>.json,
# plan_<engine>.txt, attention.json, nccl_metrics.jsonl, parts.tsv and summary.md.
#
# Knobs: BENCH_STEPS (3), BENCH_WARMUP (1), ENGINES ("zero2 zero0 zero3"), SHAPE (3b; tiny runs
# the benches on the tiny model, e.g. for a CPU rehearsal), PLAN_MODEL ($SHAPE), SKIP (part names
# to leave out, e.g. "wheels"), GPU_CHECK_PY (python3), GPU_CHECK_BUDGET_S (570).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
DRY=${GPU_CHECK_DRY:-0}
PY=${GPU_CHECK_PY:-python3}
SHAPE=${SHAPE:-3b}
STEPS=${BENCH_STEPS:-3}
WARMUP=${BENCH_WARMUP:-1}
ENGINES=${ENGINES:-"zero2 zero0 zero3"}
PLAN_MODEL=${PLAN_MODEL:-$SHAPE}
SKIP=" ${SKIP:-} "
BUDGET=${GPU_CHECK_BUDGET_S:-570}
WORK=/tmp/gpu_check
mkdir -p "$OUT"
: > "$OUT/parts.tsv"
start=$(date +%s)

# run_part NAME LIMIT_S CMD...: run CMD (a bash command line) under `timeout`, its output in
# $OUT/NAME.log, and a line "NAME status rc seconds" in parts.tsv. The limit is cut to what is left
# of the budget; a part with under 20 s left is skipped. Exit code 75 from CMD means "skipped".
run_part() {
  local name=$1 limit=$2 cmd=$3
  local left=$(( BUDGET - ($(date +%s) - start) - 5 ))
  if [[ "$SKIP" == *" $name "* ]]; then
    echo "== $name: skipped (SKIP)"
    printf '%s\tskipped (SKIP)\t-\t0\n' "$name" >> "$OUT/parts.tsv"
    return 0
  fi
  (( limit > left )) && limit=$left
  if [ "$DRY" = 1 ]; then
    printf '== %s (limit %ss)\n%s\n' "$name" "$2" "$cmd"
    printf '%s\tdry\t-\t-\n' "$name" >> "$OUT/parts.tsv"
    return 0
  fi
  if (( limit < 20 )); then
    echo "== $name: skipped, out of time" | tee "$OUT/$name.log"
    printf '%s\tout of time\t-\t0\n' "$name" >> "$OUT/parts.tsv"
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s) rc status
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    75) status=skipped ;;
    124|137) status="timed out" ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/parts.tsv"
  echo "   $status (rc $rc) in $(( $(date +%s) - t0 ))s"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

stage_of() { echo "${1#zero}"; }

if [ "$DRY" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" \
    2>&1 || echo "no nvidia-smi" > "$OUT/gpu.txt"
fi
export PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false

run_part wheels 120 "ls .whl/*.whl > /dev/null || { echo 'no .whl/: run experiments/gpu_wheels.sh on the CPU machine and carry .whl'; exit 1; }; \
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
&& $PY -c 'import deepspeed, hydra, transformers, torch; print(\"transformers\", transformers.__version__, \"deepspeed\", deepspeed.__version__, \"torch\", torch.__version__, \"cuda\", torch.cuda.is_available())'"

# The bench's configuration (experiments/bench_gpu.py, overrides_for): 4 prompts x G=8, 128 new
# tokens, micro-batch 8, checkpointing on, 600x450 images = 588x448 model pixels (336 tokens).
for engine in $ENGINES; do
  run_part "plan_$engine" 60 "$PY -m medloc.engine_plan --model $PLAN_MODEL --gpus 1 --gpu-gib 139 \
--host-gib 128 --stage $(stage_of "$engine") --prompts-per-step 4 --num-generations 8 \
--max-new-tokens 128 --micro-batch 8 --max-pixels 263424 --gradient-checkpointing \
> $OUT/plan_$engine.txt"
done

run_part nccl 150 "MEDLOC_FORCE_COLLECTIVES=1 NCCL_DEBUG=INFO $PY -m torch.distributed.run \
--standalone --nproc_per_node=1 -m medloc.train debug=cpu_tiny engine=zero2 trainer.max_steps=2 \
trainer.save_every=2 data_root=$WORK/nccl cache_dir=$WORK/nccl hydra.run.dir=$WORK/nccl/run \
&& cp $WORK/nccl/run/metrics.jsonl $OUT/nccl_metrics.jsonl \
&& echo \"NCCL INFO lines: \$(grep -c 'NCCL INFO' $OUT/nccl.log)\""

run_part attention 120 "$PY -c 'import flash_attn' 2>/dev/null || { echo 'skipped: flash-attn does not import here (sdpa only)'; exit 75; }; \
$PY -m experiments.bench_gpu --shape $SHAPE --compare-attn flash_attention_2 --workdir $WORK \
--out $OUT/attention.json"

for engine in $ENGINES; do
  floors=optimizer
  [ "$engine" = "$(echo "$ENGINES" | awk '{print $1}')" ] && floors=all
  limit=150
  [ "$floors" = all ] && limit=270
  run_part "bench_$engine" "$limit" "$PY -m experiments.bench_gpu --shape $SHAPE \
--steps $STEPS --warmup $WARMUP --floors $floors --workdir $WORK \
--out $OUT/bench_$engine.json -- engine=$engine"
done

# summary.md: the parts, the benches' tables, the plan's peak beside the measured one
OUT="$OUT" ENGINES="$ENGINES" DRY="$DRY" $PY - <<'EOF' || echo "summary failed" >> "$OUT/summary.md"
import json
import os
import re
from pathlib import Path

out = Path(os.environ["OUT"])
lines = ["# GPU check", ""]
gpu = out / "gpu.txt"
if gpu.is_file():
    lines += [f"GPU: {gpu.read_text().strip()}", ""]
lines += ["| part | status | rc | seconds |", "|---|---|---|---|"]
for row in (out / "parts.tsv").read_text().splitlines():
    lines.append("| " + " | ".join(row.split("\t")) + " |")
lines += ["", "## Bench (3B shape) and the memory plan", "",
          "| engine | s/step | generate s | reference s | policy fwd+bwd s | optimizer s "
          "| step / floors | measured peak GiB | plan peak GiB |", "|---|---|---|---|---|---|---|---|---|"]


def fmt(x, f=".2f"):
    return "-" if x is None else format(x, f)


for engine in os.environ["ENGINES"].split():
    bench = out / f"bench_{engine}.json"
    plan = out / f"plan_{engine}.txt"
    peak_plan = None
    if plan.is_file():
        m = re.search(r"per-GPU peak ([\d.]+) GiB", plan.read_text())
        peak_plan = float(m.group(1)) if m else None
    if not bench.is_file():
        lines.append(f"| {engine} | - | - | - | - | - | - | - | {fmt(peak_plan, '.1f')} |")
        continue
    r = json.loads(bench.read_text())
    med = r["trainer_median"]
    step = next(row for row in r["table"] if row["phase"] == "step")
    lines.append(
        f"| {engine} | {fmt(med['step_s'])} | {fmt(med['generate_s'])} | {fmt(med['reference_s'])}"
        f" | {fmt(med['policy_fwd_bwd_s'])} | {fmt(med['optimizer_s'], '.3f')} | "
        f"{fmt(step['ratio'])} | {fmt(r['trainer_peak_gib'], '.1f')} | {fmt(peak_plan, '.1f')} |")
lines += ["", "plan peak: medloc.engine_plan's per-GPU peak (without its reserve) for the bench's "
          "configuration; measured: torch.cuda.max_memory_allocated over the bench's timed steps.",
          "step / floors: the trainer's step over the sum of the floors (bench_gpu.py; only where "
          "every floor ran)."]
for engine in os.environ["ENGINES"].split():
    log = out / f"bench_{engine}.log"
    if log.is_file():
        text = log.read_text()
        i = text.find("GRPO step vs floors")
        if i >= 0:
            lines += ["", f"### bench_gpu at {engine}", "", "```", text[i:].strip(), "```"]
att = out / "attention.json"
if att.is_file():
    a = json.loads(att.read_text())
    lines += ["", "## sdpa vs flash_attention_2", "", "```", json.dumps(a, indent=1), "```"]
nccl = out / "nccl.log"
if nccl.is_file():
    n = nccl.read_text().count("NCCL INFO")
    lines += ["", f"## NCCL step: {n} 'NCCL INFO' lines in nccl.log"
              + (" (NCCL started)" if n else " (NCCL never started?)")]
(out / "summary.md").write_text("\n".join(lines) + "\n")
shown = next((i for i, line in enumerate(lines) if line.startswith("### ")), len(lines))
print("\n".join(lines[:shown]))
EOF
echo "written: $OUT/summary.md ($(( $(date +%s) - start ))s)"
