#!/usr/bin/env bash
# Create one venv per peer toolkit under bench/peers/.venv-<peer> (idempotent; a stamp marks a finished one).
#   bench/peers/setup.sh [modelopt|llmcompressor|torchao|llamacpp|all]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONSTRAINTS="$HERE/constraints.txt"
PYTHON="${PYTHON:-python3.11}"
TORCH="torch==2.13.0"
# run_peer.py imports leanlm.eval.perplexity, whose package imports need these (besides torch).
COMMON=(safetensors tqdm pyyaml psutil)

peer_spec() {
    case "$1" in
        modelopt) echo "nvidia-modelopt[hf]==0.47.0" ;;
        llmcompressor) echo "llmcompressor==0.14.0.1" ;;
        # torchao brings no transformers of its own; bench/decode.py runs HF models through it.
        torchao) echo "torchao==0.18.0 transformers==5.17.0 accelerate" ;;
        # No wheel for this platform: pip builds llama.cpp from the sdist (cmake + a C++ compiler, ~10 min).
        llamacpp) echo "llama-cpp-python==0.3.36" ;;
        *) return 1 ;;
    esac
}

setup_peer() {
    local peer="$1" spec venv stamp
    spec="$(peer_spec "$peer")"
    venv="$HERE/.venv-$peer"
    stamp="$venv/.leanlm-peer-stamp"
    if [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$TORCH $spec ${COMMON[*]}" ]]; then
        echo "[$peer] already set up ($venv)"
        return 0
    fi
    fail() { echo "ERROR: setting up peer '$peer' failed: $1" >&2; exit 1; }
    echo "[$peer] creating venv $venv"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv" || fail "could not create the venv with $PYTHON"
    local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")
    echo "[$peer] installing $TORCH (CPU wheel from disk)"
    "${pip[@]}" "$TORCH" || fail "pip install $TORCH"
    echo "[$peer] installing $spec ${COMMON[*]}"
    read -r -a spec_args <<< "$spec"
    "${pip[@]}" "${spec_args[@]}" "${COMMON[@]}" || fail "pip install $spec"
    local have
    have="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" || fail "torch does not import"
    [[ "$have" == 2.13.0* ]] || fail "torch $have was installed instead of 2.13.0"
    echo "$TORCH $spec ${COMMON[*]}" > "$stamp"
    echo "[$peer] done: $("$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
        | grep -iE '^(torch|torchao|transformers|nvidia-modelopt|llmcompressor|compressed-tensors) ' | tr -s ' ' | paste -sd ';')"
}

target="${1:-all}"
case "$target" in
    all) peers=(modelopt llmcompressor torchao) ;;
    modelopt|llmcompressor|torchao|llamacpp) peers=("$target") ;;
    *) echo "usage: $0 [modelopt|llmcompressor|torchao|llamacpp|all]" >&2; exit 2 ;;
esac
for p in "${peers[@]}"; do setup_peer "$p"; done
echo "peer venvs ready: ${peers[*]}"
