#!/usr/bin/env bash
# One command for a lent GPU (CUDA, no internet): the test suite on the GPU, then one distillation outer
# step at the paper's scale (a random-weight OPT-1.3B shape, bf16, LoRA r=8 on q/v, batch 8 x 512, k=2,
# N=6) per unroll mode, against 6 plain steps on the fast kernel. docs/BENCHMARKS.md records what it printed.
#
#   bash scripts/gpu_check.sh            # results under $OUT (the device tool's folder) or runs/gpu_check
#
# What the GPU machine lacks, carried from here (seen on the lent H200, 2026-12-04; docs/BENCHMARKS.md):
#   - Python packages its image does not hold (datasets, bm25s, gguf and theirs): `bash scripts/gpu_wheels.sh`
#     downloads their wheels into .whl/ (git-ignored); carry .whl and this script installs them;
#   - the shared data the suite reads (../shared/data, which does not travel): copy it into shared/data
#     (git-ignored, never committed) for the call, and delete it after.
# Knobs: SUITE_ARGS (default: tests; the suite took ~90 s without the shared data and >200 s with it on
# an H200, so a call may run part of it), SUITE_TIMEOUT (s), BENCH_MODES, BENCH_ATTNS, BENCH_TIMEOUT (s).
#
# Uses .venv/bin/python when there is one, else python3 with this checkout's src/ on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nacd-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/nacd-site"
fi
[ -d ../shared/data ] || [ -d shared/data ] || echo "gpu_check: no shared data (../shared/data or shared/data): \
the tests that read it will error; see this script's header"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: none"
  $py -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$out/env.txt"

# 1. the suite with CUDA present (device auto -> cuda); the built-in models are not there, so their tests skip.
# At the time limit pytest gets SIGINT, so it still prints the failures so far and their tracebacks.
# shellcheck disable=SC2086
timeout -s INT -k 30 "${SUITE_TIMEOUT:-320}" $py -m pytest -q -rfE -p no:cacheprovider --durations=5 ${SUITE_ARGS:-tests} 2>&1 \
  | tee "$out/pytest.txt"
suite=${PIPESTATUS[0]}

# 2. the paper-scale outer step (naive runs out of the H200's memory: it says so in its row)
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-210}" $py bench/bench_unroll.py --device cuda --shape opt-1.3b --dtype bfloat16 \
  --batch-size 8 --max-seq-len 512 --k 2 --steps 6 --modes ${BENCH_MODES:-plain flat fd naive} --attns ${BENCH_ATTNS:-sdpa} \
  --repeats 2 --out "$out" 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
echo "suite exit $suite, benchmark exit $bench" | tee -a "$out/env.txt"
exit $(( suite != 0 || bench != 0 ))
