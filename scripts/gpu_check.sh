#!/usr/bin/env bash
# One command for a lent GPU (CUDA, no internet): the test suite on the GPU, then one distillation outer
# step at the paper's scale (a random-weight OPT-1.3B shape, bf16, LoRA r=8 on q/v, batch 8 x 512, k=2,
# N=6) per unroll mode and attention, against 6 plain steps on the fast kernel. Sized for one 10-minute
# device call; docs/BENCHMARKS.md records what it printed.
#
#   bash scripts/gpu_check.sh            # results under $OUT (the device tool's folder) or runs/gpu_check
#
# Uses .venv/bin/python when there is one, else python3 with this checkout's src/ on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: none"
  $py -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$out/env.txt"

# 1. the suite with CUDA present (device auto -> cuda); the built-in models are not there, so their tests skip.
# At the time limit pytest gets SIGINT, so it still prints the failures so far and their tracebacks.
timeout -s INT -k 30 "${SUITE_TIMEOUT:-320}" $py -m pytest -q -rfE -p no:cacheprovider --durations=5 tests 2>&1 \
  | tee "$out/pytest.txt"
suite=${PIPESTATUS[0]}

# 2. the paper-scale outer step (naive is expected to run out of memory: it says so in its row)
timeout "${BENCH_TIMEOUT:-210}" $py bench/bench_unroll.py --device cuda --shape opt-1.3b --dtype bfloat16 \
  --batch-size 8 --max-seq-len 512 --k 2 --steps 6 --modes plain flat fd naive --attns sdpa eager \
  --repeats 2 --out "$out" 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
echo "suite exit $suite, benchmark exit $bench" | tee -a "$out/env.txt"
exit $(( suite != 0 || bench != 0 ))
