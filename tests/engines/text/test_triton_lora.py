"""The Triton expand kernel equals the plain reference: on CUDA where there is one, and always under
Triton's interpreter on the CPU (a subprocess: the interpreter is chosen when kernels are defined)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from fused_case import ALL, SOME, check  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed (CI installs it with the dev extra)")


def test_kernel_under_the_interpreter_equals_reference() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    run = subprocess.run([sys.executable, str(HERE / "fused_case.py")], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("err=") == 8, run.stdout


if torch.cuda.is_available():  # collected only where it can run (like the CUDA cases of test_correctness)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("rows", [1, 17, 64, 160, 288])
    @pytest.mark.parametrize("targets", [ALL, SOME], ids=["all", "some"])
    def test_kernel_on_cuda_equals_reference(dtype: torch.dtype, rows: int, targets: tuple[str, ...]) -> None:
        err = check(dtype, "cuda", rows, kernel="triton", targets=targets)
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
