#!/usr/bin/env bash
# Create (or refresh) a separate virtual environment holding the llm-compressor
# peer baseline used by benchmarks/peer_llmcompressor.py.
#
# The peer lives in its own venv because llmcompressor pins a transformers
# release that differs from the one sparseforge is developed against.
#
# Idempotent: re-running reuses the venv and only installs what is missing.
#
# Environment overrides:
#   PEER_PYTHON        interpreter used to create the venv (default: python3)
#   PEER_VENV          venv location (default: benchmarks/.venv-peer)
#   PEER_TORCH         torch requirement installed first (default: torch==2.13.0)
#   PEER_LLMCOMPRESSOR llmcompressor requirement (default: llmcompressor)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PEER_PYTHON="${PEER_PYTHON:-python3}"
PEER_VENV="${PEER_VENV:-benchmarks/.venv-peer}"
PEER_TORCH="${PEER_TORCH:-torch==2.13.0}"
PEER_LLMCOMPRESSOR="${PEER_LLMCOMPRESSOR:-llmcompressor}"

if [ ! -x "$PEER_VENV/bin/python" ]; then
    echo "[setup_peer] creating venv at $PEER_VENV"
    "$PEER_PYTHON" -m venv "$PEER_VENV"
fi
PY="$PEER_VENV/bin/python"

# pip, quiet; drops the per-package notes about configured local index
# locations that do not exist on this machine (real warnings still show).
pip_install() {
    "$PY" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

pip_install --upgrade pip

# torch first, pinned: any later requirement that torch==2.13.0 satisfies then
# installs nothing more, instead of pulling a multi-GB build of another release.
echo "[setup_peer] installing $PEER_TORCH"
pip_install "$PEER_TORCH"
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"

# Keep torch fixed while pip resolves llmcompressor and whatever it pins
# (transformers, compressed-tensors, accelerate, datasets, ...).
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

echo "[setup_peer] installing $PEER_LLMCOMPRESSOR and psutil"
pip_install -c "$CONSTRAINTS" "$PEER_LLMCOMPRESSOR" psutil

"$PY" - <<'PYEOF'
from importlib.metadata import version, PackageNotFoundError

for name in ("torch", "transformers", "llmcompressor", "compressed-tensors",
             "accelerate", "datasets", "psutil"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(f"{name}: not installed")
PYEOF
