"""`loraloom demo`: several NPCs answer at once, each on its own adapter, streamed side by side.

Starts a real daemon (a child process on a free port) on the embedded SmolLM2 with the sample
adapters, connects with the Python client, asks every NPC the same question at the same time,
and shows the answers growing in columns. Works offline on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import bridge

__all__ = ["run_demo"]

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Have you seen a dragon around here?"
TITLES = {"pirate": "Salty Meg, pirate quartermaster", "elf": "Elowen, elven archivist",
          "blacksmith": "Brunhild, grumpy blacksmith"}


def _columns(names: list[str], texts: dict[str, str], width: int) -> str:
    col = max(20, (width - 3 * (len(names) - 1)) // len(names))
    wrapped = {n: [f"[{n}]", *textwrap.wrap(texts[n] or "...", col)] for n in names}
    height = max(len(v) for v in wrapped.values())
    lines = []
    for i in range(height):
        cells = [(wrapped[n][i] if i < len(wrapped[n]) else "").ljust(col) for n in names]
        lines.append(" | ".join(cells).rstrip())
    return "\n".join(lines)


async def _converse(runtime: Path, max_tokens: int) -> int:
    tty = sys.stdout.isatty()
    async with bridge.connect(runtime_file=runtime, client_name="demo") as client:
        text_adapters = [a.name for a in client.welcome.adapters if a.kind == "text" and a.status == "ready"]
        npcs: dict[str, list[str]] = {name: [name] for name in text_adapters[:3]}
        npcs["base model"] = []
        model = client.welcome.text_model
        print(f"model: {model.name if model else '?'} on {model.device if model else '?'}; "
              f"adapters: {', '.join(text_adapters) or 'none'}")
        for name in npcs:
            if name in TITLES:
                print(f"  {name}: {TITLES[name]}")
        print(f"question to every NPC at once: {QUESTION}\n")
        texts = {n: "" for n in npcs}
        results = {}
        width = shutil.get_terminal_size((120, 40)).columns
        last_draw = 0.0

        def draw(final: bool = False) -> None:
            nonlocal last_draw
            now = time.monotonic()
            if not tty or (not final and now - last_draw < 0.1):
                return
            last_draw = now
            sys.stdout.write("\x1b[s" + _columns(list(npcs), texts, width) + "\x1b[u")
            sys.stdout.flush()

        async def npc(name: str, adapters: list[str]) -> None:
            stream = client.generate(messages=[{"role": "user", "content": QUESTION}], adapters=adapters,
                                     max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=7,
                                     repetition_penalty=1.1)
            async for piece in stream:
                texts[name] += piece
                draw()
            results[name] = stream.result

        start = time.perf_counter()
        if tty:
            sys.stdout.write("\n" * 1)
        await asyncio.gather(*(npc(n, a) for n, a in npcs.items()))
        elapsed = time.perf_counter() - start
        if tty:
            sys.stdout.write("\x1b[J")
        print(_columns(list(npcs), texts, width))
        tokens = sum(r.completion_tokens for r in results.values() if r)
        print(f"\n{len(npcs)} conversations streamed concurrently in one batch: {tokens} tokens in {elapsed:.1f}s "
              f"({tokens / elapsed:.1f} tokens/s together)")
        return 0 if all(r is not None and r.completion_tokens > 0 for r in results.values()) else 1


def run_demo(args: argparse.Namespace) -> int:
    from .engines.text.default_model import ensure_default_text_model

    if args.text_model == "default":
        try:
            model_dir = ensure_default_text_model(args.cache_dir)
        except FileNotFoundError as exc:
            print(f"loraloom: {exc}", file=sys.stderr)
            return 2
    else:
        model_dir = Path(args.text_model)
    adapters = args.adapters or ROOT / "samples" / "adapters"
    if not adapters.is_dir():
        print(f"loraloom: no adapter folder at {adapters}; the demo runs on the base model only", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="loraloom-demo-"))
    runtime = work / "daemon.json"
    log_path = work / "daemon.log"
    cmd = [sys.executable, "-m", "daemon", "serve", "--port", "0", "--runtime-file", str(runtime),
           "--token", secrets.token_urlsafe(16), "--text-model", str(model_dir), "--image-model", "none",
           "--max-seqs", "8", "--max-context", "1024", "--log-level", "warning"]
    if adapters.is_dir():
        cmd += ["--text-adapters", str(adapters), "--no-watch"]
    print("starting the daemon ...", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 180
        while not runtime.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"loraloom: the daemon did not start:\n{log_path.read_text()}", file=sys.stderr)
                return 3
            time.sleep(0.1)
        return asyncio.run(_converse(runtime, args.max_tokens))
    except bridge.LoraloomError as exc:
        print(f"loraloom: {exc}\n{log_path.read_text()}", file=sys.stderr)
        return 1
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
