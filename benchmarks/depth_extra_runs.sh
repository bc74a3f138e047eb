#!/bin/bash
# The extra depth-study runs on host 6 (benchmarks/results/depth-study.md, "Host 6"),
# as run on a GPU machine: train the configs/depth/<run>.json named in $RUNS in parallel on one
# card, evaluate each final model on the CPU (validation and test), and pack the models and logs
# into $OUT (one tar per model, without its tokenizer, plus meta.tar.gz).
#
#   RUNS="L4-deep L4-exit1 L4-w600 L1-w300" bash benchmarks/depth_extra_runs.sh
#   RUNS="L4-46M L1-46M L4-seed1 L1-seed1" LIMIT=380 bash benchmarks/depth_extra_runs.sh
#
# Needs data/english (speedec data prepare + tokenizer train). LIMIT: seconds each training may run.
# SMOKE=1: a few steps of each on the CPU, to check the job end to end.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/depth-extra-out}; mkdir -p "$OUT" runs/logs
RUNS=${RUNS:-"L4-deep L4-exit1 L4-w600 L1-w300"}
DEV=cuda; EXTRA=""; LIMIT=${LIMIT:-470}
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; LIMIT=120
  EXTRA="--max-steps 4 --set eval_every=2 --set eval_batches=1 --set batch_size=2 --set seq_len=32 --set warmup_steps=1 --set save_every=2"
fi
date; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
start=$(date +%s)
for r in $RUNS; do
  timeout "$LIMIT" python3 -m speedec.cli train --config "configs/depth/$r.json" --device $DEV --threads 1 \
    --no-progress $EXTRA > "runs/logs/$r.log" 2>&1 &
done
wait
echo "training done in $(( $(date +%s) - start )) s"
for r in $RUNS; do echo "== $r"; tail -2 "runs/logs/$r.log"; done
for r in $RUNS; do
  m=runs/depth-study/$r/model
  [ -f "$m/model.safetensors" ] || continue
  for s in validation test; do
    timeout 90 python3 -m speedec.cli eval --model "$m" --data "data/english/$s.txt" --json --prompts 0 \
      --threads 1 > "runs/logs/$r-$s.json" 2> "runs/logs/$r-$s.err" &
  done
done
wait
echo "evaluations done in $(( $(date +%s) - start )) s"
for r in $RUNS; do
  echo "$r validation ppl: $(python3 -c "import json; print(json.load(open('runs/logs/$r-validation.json'))['ppl'])" 2>/dev/null || echo none)"
  m=runs/depth-study/$r/model
  [ -f "$m/model.safetensors" ] && tar cf "$OUT/$r.tar" --exclude=tokenizer.json "$m"
done
tar czf "$OUT/meta.tar.gz" runs/logs runs/depth-study/*/metrics.jsonl 2>/dev/null
ls -la "$OUT"; date
