#!/usr/bin/env bash
# Nanbeige4.2-3B's shapes with random weights (preset nanbeige-4.2-3b-shape: 4.17B parameters,
# 22 layers run twice, the final norm closing every loop, heads of 128 with d_model 3072):
#
# 1. speedec's engines against llama.cpp on the same weights (llama.cpp's nanbeige architecture,
#    exported by speedec) at the same precision: speedec int8 (q8_0) against llama.cpp q8_0,
#    speedec bf16 against llama.cpp f16. Every row reports tok/s, the bytes of the weights it
#    decodes with (llama.cpp: its GGUF file) and the peak RSS of the process that decoded it
#    (llama.cpp runs in a worker process of its own).
# 2. The acceptance knob swept: the residual scale (the std of the residual branches' output
#    projections); speed's speedup over autoregressive against its acceptance, int8.
#
# Run it alone on the machine. Memory: the bf16 pass holds speedec's 8.3 GB model and llama.cpp's
# 8.3 GB f16 file at once (about 18 GB); the int8 passes 4.4 GB + 4.4 GB. Disk: each pass writes its
# GGUF to $TMPDIR (8.3 GB at most; the bench checks the free space first) and deletes it when done.
# Time on 2 idle cores: about 20 minutes, estimated from one short run at the real shape (int8:
# built in ~1 min, autoregressive 2.5 tok/s, llama.cpp q8_0 1.6 tok/s cold) and stand-ins; every
# model is built afresh (int8 ~1 min, bf16 ~45 s; the f16 export ~1 min). A loaded machine
# takes several times longer. Outputs go to $OUT (default benchmarks/results).
#
# Smaller runs: PRESET, PROMPTS, NEW_TOKENS, REPEATS, SCALES, SWEEP_PROMPTS, THREADS, OUT and
# SPEEDEC (the command to run) can be set; e.g. SPEEDEC="python my_wrapper.py" with a wrapper that
# registers a tiny nanbeige preset proves the script in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a speedec <<< "${SPEEDEC:-speedec}"
preset=${PRESET:-nanbeige-4.2-3b-shape}
out=${OUT:-benchmarks/results}
prompts=${PROMPTS:-2}
new=${NEW_TOKENS:-24}
repeats=${REPEATS:-2}
threads=${THREADS:-2}
# The sweep's runs: one repeat of twice the prompts (as many drafts as pass 1's int8 run).
sweep_prompts=${SWEEP_PROMPTS:-$((2 * prompts))}
# Residual scales of the sweep besides the preset's own (0.09), which pass 1's int8 run measures.
scales=${SCALES:-0.05 0.15 0.3 0.6 1.5}
mkdir -p "$out"
grep -m1 "model name" /proc/cpuinfo
grep -o -E 'avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
free -g
df -h "${TMPDIR:-/tmp}"
common=(--preset "$preset" --prompt-len 16 --max-new-tokens "$new" --threads "$threads")

# 1. Same-precision pairs: speedec's model and llama.cpp's file of the same weights.
for pair in "int8 llamacpp-q8_0" "bfloat16 llamacpp-f16"; do
    read -r dtype llama <<< "$pair"
    "${speedec[@]}" bench "${common[@]}" --dtype "$dtype" --prompts "$prompts" --repeats "$repeats" --warmup 1 \
        --engines "autoregressive,speed,self-speculative,$llama" --draft-tokens 2 \
        --json "$out/$preset-$dtype.json" | tee "$out/$preset-$dtype.txt"
done

# 2. The residual scale: acceptance and speed's speedup (int8: the faster build and decode).
sweep=("$out/$preset-int8.json")
for scale in $scales; do
    "${speedec[@]}" bench "${common[@]}" --dtype int8 --residual-scale "$scale" --prompts "$sweep_prompts" \
        --repeats 1 --warmup 0 \
        --engines autoregressive,speed --json "$out/$preset-int8-rs$scale.json" \
        | tee "$out/$preset-int8-rs$scale.txt"
    sweep+=("$out/$preset-int8-rs$scale.json")
done
python - "${sweep[@]}" <<'EOF' | tee "$out/$preset-scale-sweep.txt"
import json
import sys

rows = []
for path in sys.argv[1:]:
    report = json.load(open(path))
    engines = {e["engine"]: e for e in report["engines"]}
    speed, ar = engines["speed"], engines["autoregressive"]
    rows.append((report["residual_scale"], speed["acceptance"], speed["speedup_vs_autoregressive"],
                 speed["tokens_per_s"], ar["tokens_per_s"], speed["matches_autoregressive"], report["dtype"]))
print(f"{'scale':>7}  {'accept':>6}  {'speedup':>7}  {'speed tok/s':>11}  {'AR tok/s':>8}  {'exact':>5}  dtype")
for scale, accept, speedup, speed_tps, ar_tps, exact, dtype in sorted(rows):
    print(f"{scale:7g}  {accept:6.3f}  {speedup:6.2f}x  {speed_tps:11.2f}  {ar_tps:8.2f}  {exact:5.0%}  {dtype}")
EOF
