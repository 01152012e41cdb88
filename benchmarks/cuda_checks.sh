#!/usr/bin/env bash
# The checks that need a CUDA device, as one run from the repository root:
#   bash benchmarks/cuda_checks.sh [OUT_DIR]        (default: cuda-checks/)
# 1. the tests marked gpu (tests/test_gpu.py and any others),
# 2. benchmarks/moe_layer.py on cuda in fp32 and in bf16,
# 3. benchmarks/train_throughput.py on cuda,
# 4. benchmarks/attention.py on cuda with the FlexAttention backend,
# 5. benchmarks/nm_gpu.py: 2:4 semi-structured vs dense fp16 matmul at large shapes (step 1 also
#    runs the 2:4 export tests, tests/weights/test_weights_gpu.py).
# It uses the Python in $PYTHON (default python3) with its own torch, and the source tree
# through PYTHONPATH, so it needs no install. Each step's output goes to OUT_DIR (env.txt,
# gpu_tests.log, moe_layer_fp32.log, moe_layer_bf16.log, train_throughput.log, attention_flex.log,
# nm_gpu.log) and each
# benchmark's JSON line also to OUT_DIR/results.jsonl. Exits non-zero when a step fails, after
# running the others; a step that runs past its time limit counts as failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-cuda-checks}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$out/$name.log"
    if [ $rc -ne 0 ]; then
        echo "== $name FAILED (exit $rc)"
        failed+=("$name")
    fi
    tail -n 1 "$out/$name.log" | grep '^{' >>"$out/results.jsonl"  # a benchmark's JSON line
}

if ! "$py" - >"$out/env.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs")
else:
    print("no CUDA device")
EOF
then
    cat "$out/env.txt" >&2
    echo "$py cannot run torch (set PYTHON to a Python that has it)" >&2
    exit 2
fi
cat "$out/env.txt"
if ! grep -q '^device' "$out/env.txt"; then
    echo "no CUDA device here: nothing to check" >&2
    exit 2
fi

step gpu_tests 300 "$py" -m pytest -q -m gpu -p no:cacheprovider tests
step moe_layer_fp32 150 "$py" benchmarks/moe_layer.py --device cuda --dtype fp32 --repeats 15
step moe_layer_bf16 150 "$py" benchmarks/moe_layer.py --device cuda --dtype bf16 --repeats 15
step train_throughput 150 "$py" benchmarks/train_throughput.py --device cuda
step attention_flex 150 "$py" benchmarks/attention.py --device cuda --backend flex --repeats 10
step nm_gpu 150 "$py" benchmarks/nm_gpu.py --dtype fp16

if [ ${#failed[@]} -ne 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all CUDA checks passed"
