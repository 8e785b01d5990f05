#!/usr/bin/env bash
# Set up what the upstream-side reference scripts need (never part of CI, never committed):
#   1. the upstream IXC2.5 model code, extracted from a git copy of InternLM/InternLM-XComposer into
#      UPSTREAM_DIR (default /work/upstream/base), outside this repository;
#   2. a separate venv, VENV (default /work/venv-ref), with the torch / transformers versions the
#      upstream code runs under (see tools/reference/README.md "Environment").
#
# Usage:
#   tools/reference/setup_upstream_env.sh [UPSTREAM_GIT_DIR]
# UPSTREAM_GIT_DIR is a clone (or bare git dir) of github.com/InternLM/InternLM-XComposer; default
# /work/.mirror/InternLM+InternLM-XComposer/repo. Without it, pass UPSTREAM_GIT_URL=... to clone.
# Environment: UPSTREAM_DIR, VENV, PYTHON (interpreter that creates the venv, default python3),
# UPSTREAM_REV (default HEAD).
# Re-running is safe: an existing UPSTREAM_DIR is replaced, an existing venv is reused and completed.
set -euo pipefail

GIT_DIR_SRC="${1:-/work/.mirror/InternLM+InternLM-XComposer/repo}"
UPSTREAM_DIR="${UPSTREAM_DIR:-/work/upstream/base}"
VENV="${VENV:-/work/venv-ref}"
PYTHON="${PYTHON:-python3}"
UPSTREAM_REV="${UPSTREAM_REV:-HEAD}"
SUBDIR="InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/base"

# ---- 1. upstream code ---------------------------------------------------------------------------
if [ ! -d "$GIT_DIR_SRC" ]; then
    if [ -n "${UPSTREAM_GIT_URL:-}" ]; then
        GIT_DIR_SRC="$(mktemp -d)/repo"
        git clone --bare --filter=blob:none "$UPSTREAM_GIT_URL" "$GIT_DIR_SRC"
    else
        echo "error: no upstream git copy at $GIT_DIR_SRC (pass its path, or set UPSTREAM_GIT_URL)" >&2
        exit 2
    fi
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
GD="$(git -C "$GIT_DIR_SRC" rev-parse --absolute-git-dir)"
# Only the files whose contents the copy holds: snapshots may omit large blobs (the bundled font, the
# tokenizer) that the model code does not need. `git archive` works on bare and non-bare copies alike.
paths=()
while read -r _mode _type sha path; do
    [ "$_type" = blob ] && git --git-dir="$GD" cat-file -e "$sha" 2>/dev/null && paths+=("$path")
done < <(git --git-dir="$GD" ls-tree -r "$UPSTREAM_REV" "$SUBDIR/")
git --git-dir="$GD" archive "$UPSTREAM_REV" "${paths[@]}" | tar -x -C "$tmp"
rm -rf "$UPSTREAM_DIR"
mkdir -p "$(dirname "$UPSTREAM_DIR")"
mv "$tmp/$SUBDIR" "$UPSTREAM_DIR"
for f in build_mlp.py ixc_utils.py modeling_internlm2.py modeling_internlm_xcomposer2.py \
         configuration_internlm_xcomposer2.py tokenization_internlm2.py; do
    [ -f "$UPSTREAM_DIR/$f" ] || { echo "error: $UPSTREAM_DIR/$f missing after extraction" >&2; exit 1; }
done
echo "upstream code ($UPSTREAM_REV of $GIT_DIR_SRC) -> $UPSTREAM_DIR"

# ---- 2. venv ------------------------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch 2.14.1 and torchvision 0.29.1 load together (PyPI's torchvision does not load beside other
# torch releases); transformers 4.33.2 is what upstream targets. The CPU build is preferred when the
# PyTorch CPU index is reachable; otherwise whatever the configured index offers for that version.
PKGS=(torch==2.14.1 torchvision==0.29.1 transformers==4.33.2 sentencepiece einops safetensors
      "numpy<2" pillow)
CPU_INDEX=https://download.pytorch.org/whl/cpu
# Probe the CPU index once (5 s): an unreachable extra index makes pip retry it for every package.
if "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/torch/', timeout=5)" \
        2>/dev/null; then
    "$VENV/bin/pip" install --extra-index-url "$CPU_INDEX" "${PKGS[@]}"
else
    echo "note: $CPU_INDEX unreachable: installing torch from the configured index" >&2
    "$VENV/bin/pip" install "${PKGS[@]}"
fi
# ixc_utils.py imports decord at module level (video); optional for images, so a failure is not fatal.
"$VENV/bin/pip" install decord || echo "warning: decord did not install; upstream ixc_utils import may fail" >&2
"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers
print("venv ok: torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__)
PY
