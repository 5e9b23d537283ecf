"""`loraloom bundle --out DIR`: the self-contained runtime a game ships (no Python on the player's machine).

A PyInstaller one-folder build of this very environment: `DIR/loraloom` (`loraloom.exe` on Windows)
takes the same command line as the `loraloom` console script. One folder, not one file, because a
one-file build unpacks its ~0.5-3 GB of torch into a temporary folder on every start (seconds of
cold start, and the disk twice over), while a folder starts in place and lets the game's installer
and patcher diff it file by file (docs/SHIPPING.md says more, with sizes and start times).

The build carries what `serve` needs (torch, tokenizers, transformers, safetensors, llguidance,
numba, websockets, msgpack, pydantic) and leaves out what only developers use (training, benchmarks,
the GGUF conversion of the embedded model, triton unless torch is a CUDA build, tests); `--with-image` adds diffusers
for a real image model. The torch inside is the one installed here: a CUDA torch gives the RTX build.
`DIR/BUILD.json` records what went in, and the pack's manifest can be checked against it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__

__all__ = ["EXCLUDED", "add_command", "build_bundle", "executable_name", "pyinstaller_args"]

NAME = "loraloom"
# Never needed to serve: developer tools, the GGUF conversion, training, GUIs, notebooks.
EXCLUDED = ("tkinter", "matplotlib", "IPython", "jupyter", "notebook", "pytest", "hypothesis", "mypy", "ruff",
            "peft", "accelerate", "gguf", "torch.utils.tensorboard", "tensorboard", "torchvision",
            "torchaudio", "pandas", "sklearn", "scipy", "pyte", "jsonschema", "rich", "benchmarks", "tests",
            "daemon.train", "daemon.demo")
IMAGE_ONLY = ("diffusers", "PIL")
CUDA_ONLY = ("triton",)  # the CUDA kernels' compiler; a CPU torch never calls it
# Packages whose data files or metadata transformers and tokenizers read when they start.
DATA = ("transformers", "tokenizers", "llguidance")
METADATA = ("transformers", "tokenizers", "safetensors", "huggingface-hub", "torch", "numpy", "tqdm", "regex",
            "requests", "packaging", "filelock", "pyyaml", "loraloom")
ENTRY = """\
import multiprocessing
import sys

from daemon.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
"""


def executable_name() -> str:
    return NAME + (".exe" if sys.platform == "win32" else "")


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(dist)
    except PackageNotFoundError:
        return False
    return True


def pyinstaller_args(work: Path, entry: Path, *, with_image: bool, cuda: bool) -> list[str]:
    """PyInstaller's command line for the one-folder build (its output lands in `work/dist/loraloom`)."""
    args = [str(entry), "--onedir", "--noconfirm", "--clean", "--log-level", "WARN", "--name", NAME,
            "--distpath", str(work / "dist"), "--workpath", str(work / "build"), "--specpath", str(work),
            "--collect-submodules", "daemon", "--collect-submodules", "bridge", "--console"]
    excluded = EXCLUDED + (() if with_image else IMAGE_ONLY) + (() if cuda else CUDA_ONLY)
    for mod in excluded:
        args += ["--exclude-module", mod]
    for pkg in DATA:
        args += ["--collect-data", pkg]
    for dist in METADATA:
        if _installed(dist):
            args += ["--copy-metadata", dist]
    return args


def build_bundle(out: Path, *, with_image: bool = False, work: Path | None = None) -> dict[str, Any]:
    """Build the runtime into `out` (replaced when it exists) and return what BUILD.json records."""
    import torch

    out = out.resolve()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loraloom-bundle-") as tmp:
        work = (work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        entry = work / "loraloom_entry.py"
        entry.write_text(ENTRY, encoding="utf-8")
        root = Path(__file__).resolve().parent.parent  # so `daemon` and `bridge` are found from a checkout too
        args = pyinstaller_args(work, entry, with_image=with_image, cuda=torch.version.cuda is not None)
        cmd = [sys.executable, "-m", "PyInstaller", *args, "--paths", str(root)]
        subprocess.run(cmd, check=True, cwd=work)
        built = work / "dist" / NAME
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built), str(out))
    info = {"runtime": __version__, "python": platform.python_version(), "platform": sys.platform,
            "machine": platform.machine(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "image": with_image, "executable": executable_name(), "build_s": round(time.monotonic() - started, 1),
            "size_mb": round(folder_bytes(out) / 2**20, 1)}
    (out / "BUILD.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def cmd_bundle(args: argparse.Namespace) -> int:
    if _missing("PyInstaller"):
        print("loraloom bundle: PyInstaller is not installed (pip install -e '.[bundle]')", file=sys.stderr)
        return 2
    info = build_bundle(args.out, with_image=args.with_image, work=args.work)
    print(f"wrote {args.out / info['executable']} ({info['size_mb']} MiB, torch {info['torch']}, "
          f"built in {info['build_s']} s)")
    return 0


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def add_command(sub: Any) -> None:
    """`loraloom bundle` on the CLI's subparsers."""
    p = sub.add_parser("bundle", help="build the self-contained runtime folder a game ships (PyInstaller)")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (replaced when it exists)")
    p.add_argument("--with-image", action="store_true", help="include diffusers, for a real image model")
    p.add_argument("--work", type=Path, help="PyInstaller's work folder (default: a temporary one)")
    p.set_defaults(func=cmd_bundle)
