#!/usr/bin/env bash
# GPU check (issue 16): bf16 masked pruning step vs plain step, peak memory, exported vs masked
# logits. Needs only torch and transformers: the repository root goes on PYTHONPATH so the
# pure-torch drp_foundry.pruning package is importable uninstalled. `--help` lists the options.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/bench/gpu_check.py" "$@"
