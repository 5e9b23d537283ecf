"""`loraloom demo`, the newcomer's main job, on the embedded model with the sample adapters."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_demo_streams_several_npcs_and_exits_0(smollm2_dir) -> None:
    r = subprocess.run([sys.executable, "-m", "daemon", "demo", "--max-tokens", "24"], capture_output=True,
                       text=True, cwd=ROOT, timeout=500)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "SmolLM2-135M-Instruct" in out
    samples = sorted(p.name for p in (ROOT / "samples" / "adapters").iterdir() if p.is_dir())
    assert samples, "samples/adapters holds the trained persona adapters"
    header = next(line for line in out.splitlines() if line.startswith("["))
    for name in [*samples[:3], "base model"]:
        assert f"[{name}]" in header
    assert "conversations streamed concurrently" in out
