#!/usr/bin/env bash
# Use sparsedial from this source tree without installing it (e.g. on a machine that already has torch,
# triton and transformers but no network): builds the `sparsedial` package layout under a temporary
# folder with links to the top-level folders, and prints the PYTHONPATH to export.
#   export PYTHONPATH=$(bash scripts/source_env.sh)
#   python3 -P -m pytest tests/kernels -m gpu     # -P: the checkout's own sparsedial/ must not shadow it
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${SPARSEDIAL_SOURCE_ENV:-/tmp/sparsedial-src}"
rm -rf "$dest" && mkdir -p "$dest/sparsedial"
cp "$root"/sparsedial/*.py "$dest/sparsedial/"
for d in engine compress kernels server clients; do ln -s "$root/$d" "$dest/sparsedial/$d"; done
echo "$dest"
