#!/usr/bin/env bash
# The 8-bit (q8_0) measurements of BENCHMARKS.md ("8-bit weights"), one after another
# with nothing else running: step-cost curves per kernel path, engines against
# llama.cpp's q8_0 rows (unrolled and looped exports), Ouro-1.4B's shapes at float32,
# bf16 and int8, and how much int8 changes membound's greedy tokens.
# llama.cpp rows need llama-cpp-python (pip install -e ".[llamacpp]"); without it they
# are skipped with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
grep -m1 "model name" /proc/cpuinfo
grep -o -E 'avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo

for dtype in int8 bfloat16 float32; do
    speedec kernels --preset membound --dtype "$dtype" --max-rows 8 --rounds 3 | tee "$out/kernels-membound-$dtype.txt"
done

llama="llamacpp-q8_0,llamacpp-looped-q8_0"
speedec bench --preset membound --dtype int8 --repeats 5 --engines "autoregressive,speed,$llama" \
    --json "$out/membound-int8.json" | tee "$out/membound-int8.txt"
speedec bench --preset default --dtype int8 --repeats 5 --engines "autoregressive,speed,$llama" \
    --json "$out/default-int8.json" | tee "$out/default-int8.txt"

# Ouro-1.4B's shapes: 5.7 GB float32, 2.9 GB bf16, 1.5 GB int8; short runs.
for dtype in int8 bfloat16 float32; do
    speedec bench --preset ouro-1.4b-shape --dtype "$dtype" --prompts 2 --max-new-tokens 24 --repeats 3 \
        --json "$out/ouro-1.4b-shape-$dtype.json" | tee "$out/ouro-1.4b-shape-$dtype.txt"
done

python benchmarks/q8_agreement.py --preset membound --prompts 8 --new-tokens 64 \
    --json "$out/q8-agreement-membound.json"
