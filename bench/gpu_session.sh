#!/usr/bin/env bash
# One lent-GPU session in one command: install the carried wheels, run the GPU tests, then the three
# benches side by side, each stage under its own time limit so one that hangs or fails costs only itself.
# Logs and result files land in $OUT (one tarball), named <device>-<bench>-<sha>.
#   PDENGINE_GIT_SHA=<sha> bash bench/gpu_session.sh          (carry .whl: diffusers, importlib_metadata, av)
# Budget knobs: T_TESTS, T_KERNELS (per family), T_SAMPLE, T_TRAIN, T_COMPILE (seconds).
set -u
OUT=${OUT:-/tmp/pdengine-gpu}
SHA=${PDENGINE_GIT_SHA:-unknown}
R=$OUT/results; mkdir -p "$R"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PDENGINE_GIT_SHA=$SHA
LOG=$OUT/session.log
stage() { echo "=== $(date +%T) $*" | tee -a "$LOG"; }
pd() { python3 -c 'import sys; from pdengine.engine.cli import main; sys.argv[0] = "pdengine"; main()' "$@"; }

stage setup
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; }
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/pd . >>"$LOG" 2>&1 \
  || echo "project install failed" | tee -a "$LOG"
export PYTHONPATH=/tmp/pd:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.limit \
  --format=csv 2>&1 | tee -a "$LOG"
python3 -c 'import torch, triton, diffusers, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"diffusers", diffusers.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name(0))' 2>&1 | tee -a "$LOG"

stage gpu tests
timeout "${T_TESTS:-110}" python3 -m pytest -m gpu -v -rs -p no:cacheprovider tests/test_kernels_gpu.py \
  tests/test_kernel_latent_update.py tests/test_kernel_concat_cond.py tests/test_schedulers.py tests/test_pipeline.py \
  >"$R/cuda-tests-$SHA.log" 2>&1; echo "rc=$?" >>"$R/cuda-tests-$SHA.log"; tail -25 "$R/cuda-tests-$SHA.log" | tee -a "$LOG"

for fam in latent_update concat_cond temporal_conv temporal_attention; do
  stage "bench kernels $fam"
  timeout "${T_KERNELS:-45}" pd bench kernels --device cuda --quick --family $fam \
    --json "$R/cuda-kernels-$fam-$SHA.json" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
done

stage bench sample
timeout "${T_SAMPLE:-100}" pd bench sample --device cuda --batch 1 --batch 8 --steps 50 --compile-mode none \
  --json "$R/cuda-sample-$SHA.json" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"

stage bench train
timeout "${T_TRAIN:-70}" pd bench train --device cuda --batch 1 --batch 4 --steps 3 \
  --json "$R/cuda-train-$SHA.json" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"

stage bench sample torch.compile
timeout "${T_COMPILE:-100}" pd bench sample --device cuda --batch 8 --steps 50 --compile-mode default \
  --json "$R/cuda-sample-compile-$SHA.json" >>"$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"

stage done
tar -czf "$OUT/results.tgz" -C "$OUT" results session.log
grep -h "provider=\|passed\|failed\|error" "$LOG" | tail -40
