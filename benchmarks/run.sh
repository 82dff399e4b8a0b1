#!/usr/bin/env bash
# The figures in the README: run on an otherwise idle machine. Results go to benchmarks/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/out
mkdir -p "$out"
export ENGINE_CACHE_DIR="$(mktemp -d)"  # cold cache: every figure is measured, none recalled
run() { local name=$1; shift; /usr/bin/time -f "$name: %e s wall" python -m engine "$@" --json > "$out/$name.json"; }
run toggle bench toggle
run compare compare --plans fp32,fp16,bf16,int8-linear,int8,int4 --data embedded,amazon
run runtimes compare --plans fp32,int8,int4 --runtime torch,onnxruntime
run sensitivity sensitivity --precisions int8,int4
run search search --max-drop 1.0
run smoothquant-static smoothquant --alpha 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,auto --act static
python benchmarks/ort_agreement.py --json "$out/ort-agreement.json" > "$out/ort-agreement.md"
python benchmarks/methods.py --agreement --json "$out/methods.json" > "$out/methods.md"  # methods, calibrators, deployed = simulated
run smoothquant-dynamic smoothquant --alpha 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,auto --act dynamic
python benchmarks/load_test.py --json "$out/load-test.json" > "$out/load-test.md"  # 8 sessions on one server
