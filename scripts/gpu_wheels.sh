#!/usr/bin/env bash
# Download into .whl/ the wheels of the packages nacd needs that the lent GPU machine's image lacks
# (datasets, bm25s, gguf and the two of datasets' own it lacks), at the versions this checkout's .venv
# holds, for CPython 3.12 on x86-64; scripts/gpu_check.sh installs them there. .whl/ is git-ignored.
#
#   bash scripts/gpu_wheels.sh && cp -r ../shared/data shared/data   # then carry .whl in the device call
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
grep -qx '/shared/' .git/info/exclude 2>/dev/null || echo /shared/ >>.git/info/exclude
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
specs=()
for name in datasets dill multiprocess bm25s gguf; do
  version=$($py -c "from importlib.metadata import version; print(version('$name'))")
  specs+=("$name==$version")
done
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
ls .whl
