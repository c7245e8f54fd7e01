#!/usr/bin/env bash
# The GPU checks, as one script for a session that is lent a device machine (the device tool's
# README has the rules). That machine has CuPy, NumPy, msgpack, click, safetensors, threadpoolctl
# and pytest, but no pyzmq and no package registry, so pyzmq travels as a wheel. Prepare here, once:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl pyzmq
#
# then run there, in one call:  run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=360)
# Logs land in $OUT (or ./gpu_check_out where $OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# ringpipe's folders import as `ringpipe.runtime`, `ringpipe.model`, ...: without installing
# (that machine has no package registry), a folder named ringpipe pointing at this checkout does it.
mkdir -p /tmp/ringpipe_path && ln -sfn "$PWD" /tmp/ringpipe_path/ringpipe
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:/tmp/ringpipe_path${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="/tmp/ringpipe_path${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, numpy, cupy, zmq; print(sys.version.split()[0], 'numpy', numpy.__version__,
'cupy', cupy.__version__, 'pyzmq', zmq.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"
    python3 -c "from ringpipe.model.nn import kernels; print('C kernels:', kernels.status())"
} 2>&1 | tee "$OUT/environment.txt"

# `-o addopts=""`: pyproject's addopts asks for pytest-xdist's two processes, which that machine lacks.
# The local_cluster fixture comes from the installed package's pytest plugin; load it by hand
# where ringpipe is not installed.
plugin=(-p ringpipe.runtime.testing)
if python3 -c "import importlib.metadata as m, sys; sys.exit(not any(e.name == 'ringpipe' for e in m.entry_points(group='pytest11')))"; then
    plugin=()
fi

# Every stage has its own deadline; together they stay under ~320 s (run with timeout_s of about 330-420).
# 1. Correctness on the device (~90 s): the GPU tests against CPU float64, mixed precision's 50-step loss
#    tolerance on CuPy, the runtime's collectives on CuPy arrays with 2-4 ranks, the NCCL communicator
#    with a one-rank group (multi-rank NCCL needs a GPU per rank: skipped, with that reason), and the
#    step benchmark on a small shape.
timeout 110 python3 -m pytest -o addopts="" -q -rs "${plugin[@]}" tests/test_gpu.py \
    "tests/test_runtime_collectives.py::test_cupy_arrays_stay_on_the_device" 2>&1 | tee "$OUT/gpu_tests.log"
gpu_status=${PIPESTATUS[0]}

# 2. A short real run on the GPU (~40 s): 2 workers, tp 2, mixed precision, on the default corpus, then a sample.
timeout 70 python3 -m ringpipe.cluster train --device gpu --dtype fp16-mixed --nproc 2 --tp 2 --n-layer 4 --n-head 4 \
    --n-embd 128 --block-size 64 --batch-size 16 --steps 30 --eval-every 15 --eval-iters 2 \
    --sample 100 --overwrite --out /tmp/gpu_run 2>&1 | tr '\r' '\n' | tail -25 | tee "$OUT/train.log"
train_status=${PIPESTATUS[0]}

# 3. GPT-2 124M shape, batch 8 x 1024: train-step tokens/s and MFU, float32 and fp16-mixed, ringpipe vs
#    GPT2LMHeadModel in PyTorch eager when torch (with CUDA) is installed (the column says why otherwise).
#    Target: ringpipe >= 0.8x PyTorch eager in both; a measurement, not a pass/fail check.
timeout 140 python3 -m ringpipe.cluster bench gpu-step --json "$OUT/bench_gpu_step.json" 2>&1 | tee "$OUT/bench_gpu_step.log"
bench_status=${PIPESTATUS[0]}

echo "status: gpu tests $gpu_status, mixed-precision tp2 run $train_status, step benchmark $bench_status" \
    | tee "$OUT/status.txt"
[ "$gpu_status" -eq 0 ] && [ "$train_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
