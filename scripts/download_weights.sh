#!/usr/bin/env bash
# Download a GPT-2 model from the Hugging Face hub into ~/.cache/gpt2-pytorch/<name> (or $GPT2_PYTORCH_CACHE),
# resumable and checksum-verified. Usage:
#   scripts/download_weights.sh [gpt2|gpt2-medium|gpt2-large|gpt2-xl|distilgpt2] [--dir DIR] [--quiet]
# The work is done by gpt2/download.py (python3 -m gpt2.download); set PYTHON to use another interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m gpt2.download "$@"
