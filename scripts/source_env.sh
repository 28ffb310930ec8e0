#!/usr/bin/env bash
# Use sparsedial from this source tree without installing it (e.g. on a machine that already has torch,
# triton and transformers but no network): prints the PYTHONPATH to export, the checkout's root. There,
# sparsedial/__init__.py adds the root to the package's path, so sparsedial.engine, .server, .compress,
# .kernels, .clients and .models import from the top-level folders.
#   export PYTHONPATH=$(bash scripts/source_env.sh)
#   python3 -P -m pytest tests/kernels -m gpu
set -euo pipefail
cd "$(dirname "$0")/.." && pwd
