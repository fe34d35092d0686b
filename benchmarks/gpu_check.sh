#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu/check.py for the steps; README "GPU" for how to run it).
#   benchmarks/gpu_check.sh                   # on the GPU machine: CUDA build, fidelity, speed; about 9 minutes
#   benchmarks/gpu_check.sh --cpu-rehearsal   # here: the same script with GGML_CUDA off on tiny shapes
# Other flags: --budget-s N (seconds for the whole check), --only STEP,STEP, --redo. Results: $OUT/gpu.md, gpu.json,
# log.txt, build.log ($OUT defaults to .gpu-work/out). Needs .gpu-carry (python -m benchmarks.gpu.prepare).
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
CARRY=${RANK1_GPU_CARRY:-$ROOT/.gpu-carry}
WORK=${RANK1_GPU_WORK:-$ROOT/.gpu-work}
OUT=${OUT:-$WORK/out}
PY=${PYTHON:-python3}
mkdir -p "$WORK" "$OUT" || exit 2
if [ ! -d "$CARRY/wheels" ]; then
    echo "error: no carry folder at $CARRY: run 'python -m benchmarks.gpu.prepare' where a package index is reachable" >&2
    exit 2
fi
# the wheels the GPU machine lacks, installed beside (not into) its Python; the built llama_cpp goes to llama-site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --upgrade \
    --target "$WORK/wheels-site" "$CARRY"/wheels/*.whl || exit 2
export PYTHONPATH="$ROOT:$WORK/llama-site:$WORK/wheels-site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export RANK1_VOCAB_DIR="$CARRY/llama-cpp-python/vendor/llama.cpp/models"
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
case " $* " in
    *" --cpu-rehearsal "*) ;;
    *)  # the GPU machine is bare: fixtures live with the rest of the work, which a warm machine keeps between calls
        export RANK1_FIXTURES_DIR="${RANK1_FIXTURES_DIR:-$WORK/fixture-cache}"
        if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi ;;
esac
set -o pipefail
"$PY" -m benchmarks.gpu.check --work "$WORK" --out "$OUT" --carry "$CARRY" "$@" 2>&1 | tee "$OUT/log.txt"
