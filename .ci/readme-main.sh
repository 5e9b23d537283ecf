#!/usr/bin/env bash
# Runs the README's main command exactly as written, the way a newcomer would: in a fresh copy of
# the repository (tracked files and new ones git does not ignore: no .venv, no caches), with an
# empty cache folder (no converted model, no pip wheels), then checks what the demo printed.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

command="$(python3 "$repo/.ci/readme_commands.py" main)"
echo "\$ $command"
mkdir -p "$work/repo" "$work/cache"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) \
  | tar -xf - -C "$work/repo"

start=$(date +%s)
status=0
path="${PATH//$repo\/.venv\/bin:/}"   # not CI's own virtualenv
(cd "$work/repo" && env -u VIRTUAL_ENV -u LORALOOM_CACHE_DIR -u LORALOOM_RUNTIME_FILE PATH="$path" \
  XDG_CACHE_HOME="$work/cache" bash -c "$command") >"$work/out.txt" 2>&1 || status=$?
tail -n 40 "$work/out.txt"
echo "exit status $status after $(( $(date +%s) - start )) s"
[ "$status" -eq 0 ] || { echo "the README's main command failed"; exit 1; }
python3 - "$work/out.txt" <<'PY'
import sys
out = open(sys.argv[1], encoding="utf-8", errors="replace").read()
needed = ["SmolLM2-135M-Instruct", "╭─ pirate", "╭─ elf", "╭─ blacksmith", "╭─ base model",
          "NPCs answered at once, in one batch"]
missing = [n for n in needed if n not in out]
if missing:
    sys.exit(f"the demo's output lacks {missing}")
print("the README's main command works on a fresh copy: the demo answered with all four NPCs")
PY
