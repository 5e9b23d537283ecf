"""The C# the generator writes for every annotation it supports compiles with mcs (C# 7.2) and
round-trips frames byte for byte, and the real generated classes restore the pydantic defaults.

Beside Loraloom.Core, the classes generated from tests/bridge/protocol_samples.py (in the namespace
Loraloom.Core.Sample) are compiled with RoundTrip.cs into one program. It decodes frames written
by Python, in reversed field order, with the fields that hold their default left out and an unknown
field added, and must encode each one to the canonical bytes of the pydantic model.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
from pydantic import BaseModel

from bridge import gen, gen_csharp
from bridge.codec import encode

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "unity_package" / "Runtime" / "Core"
INSTALL_HINT = "install it with `bash .ci/install-unity-deps.sh`"


def _samples() -> Any:
    # Imported by name (as tests/bridge does), so that pydantic finds the one module's classes.
    sys.path.insert(0, str(ROOT / "tests" / "bridge"))
    return importlib.import_module("protocol_samples")


def _variants(message: BaseModel) -> list[bytes]:
    """The canonical frame, and the same message sparse: reversed, defaults left out, one field more."""
    sparse = message.model_dump(mode="python", exclude_defaults=True, exclude_none=True)
    shuffled = {"x_future_field": [1, "two", None], **dict(reversed(list(sparse.items())))}
    shuffled["type"] = type(message).model_fields["type"].default
    return [encode(message), msgpack.packb(shuffled, use_bin_type=True)]


def test_generated_csharp_round_trips_every_annotation(tmp_path: Path) -> None:
    """Sample and real messages decode into the generated classes and encode to the canonical bytes."""
    mcs, mono = shutil.which("mcs"), shutil.which("mono")
    assert mcs and mono, f"mcs and mono are needed: {INSTALL_HINT}"
    samples = _samples()
    generated = tmp_path / "sample"
    generated.mkdir()
    for name, text in gen_csharp.render(samples.sample_spec(), "Loraloom.Core.Sample").items():
        (generated / name).write_text(text)
    exe = tmp_path / "RoundTrip.exe"
    sources = [*sorted(map(str, CORE.rglob("*.cs"))), *sorted(map(str, generated.glob("*.cs"))),
               str(Path(__file__).parent / "RoundTrip.cs")]
    proc = subprocess.run([mcs, "-langversion:7.2", "-target:exe", "-warnaserror+", "-nowarn:1591",
                           f"-out:{exe}", "-r:System.Net.Http", *sources], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    cases = tmp_path / "cases"
    cases.mkdir()
    messages = [("sample", n, msg) for n, msg in samples.EXAMPLES.items()]
    messages += [("real", n, msg) for n, msg in gen.EXAMPLES.items()]
    for kind, name, message in messages:
        canonical = encode(message)
        for i, frame in enumerate(_variants(message)):
            (cases / f"{kind}.{name}.{i}.in").write_bytes(frame)
            (cases / f"{kind}.{name}.{i}.out").write_bytes(canonical)
    run = subprocess.run([mono, str(exe), str(cases)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == 2 * len(messages), run.stdout
