#!/usr/bin/env bash
# Builds the self-contained CPU runtime (`loraloom bundle`, PyInstaller one-folder; ~5 min on 2 cores)
# into build/ci-bundle/runtime, for tests/shipping/test_bundle.py, which runs it with `env -i` from another
# folder. The tests find it through LORALOOM_TEST_BUNDLE (.ci/run exports it); without it they build
# their own copy first (slower, never skipped). Prints the build time and the folder's size.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  source .venv/bin/activate
fi
out=build/ci-bundle/runtime
start=$(date +%s)
python -m daemon bundle --out "$out" --work build/ci-bundle/work
rm -rf build/ci-bundle/work
echo "bundle built in $(( $(date +%s) - start )) s: $(du -sh "$out" | cut -f1)"
