"""`loraloom demo`: several NPCs answer at once, each on its own adapter, streamed side by side.

Starts a real daemon (a child process on a free port) on the embedded SmolLM2 with the sample
adapters, connects with the Python client, asks every NPC the same question at the same time,
and shows the answers growing in panels. Works offline on a CPU.

The live view is rich's `Live`: it redraws by moving the cursor up over what it drew last and
erasing each line, so it stays right when the terminal scrolls (a start at the bottom of a full
screen) and at any width (panels go two or four to a row). Without a terminal it prints the
final panels once.
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
import time
import unicodedata
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

import bridge
from bridge.messages import Result

__all__ = ["run_demo"]

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Have you seen a dragon around here?"
TITLES = {"pirate": "Salty Meg, pirate quartermaster", "elf": "Elowen, elven archivist",
          "blacksmith": "Brunhild, grumpy blacksmith"}
BASE = "base model"
_PANEL_MIN_WIDTH = 34  # narrower panels wrap every few words


class _Npc:
    def __init__(self, name: str, adapters: list[str]) -> None:
        self.name = name
        self.adapters = adapters
        self.text = ""
        self.tokens = 0
        self.result: Result | None = None
        self.error: str | None = None

    def panel(self, width: int) -> Panel:
        title = f"{self.name} — {TITLES[self.name]}" if self.name in TITLES else self.name
        if len(title) > width - 6:
            title = self.name
        if self.error:
            body, style = Text(self.error, style="red"), "red"
        else:
            body, style = Text(_printable(self.text).strip() or "…"), "green" if self.result else "blue"
        state = "done" if self.result else "streaming"
        return Panel(body, title=Text(title, style="bold"), title_align="left",
                     subtitle=f"{self.tokens} tokens, {state}", subtitle_align="right", border_style=style)


def _printable(text: str) -> str:
    """Model output as it may be shown in a terminal: control characters (a model can emit ESC or
    a carriage return as well as any token) become spaces, so they can never move the cursor."""
    return "".join(c if c == "\n" or unicodedata.category(c) not in ("Cc", "Cf") else " " for c in text)


def _layout(npcs: list[_Npc], width: int) -> RenderableType:
    """The panels, as many to a row as fit (four at 160 columns, two at 80, one below 68)."""
    per_row = max(1, min(len(npcs), width // _PANEL_MIN_WIDTH, 4))
    if per_row == 3 and len(npcs) == 4:
        per_row = 2  # 2 x 2 reads better than 3 + 1
    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in range(per_row):
        grid.add_column(ratio=1)
    panel_width = width // per_row - 1
    for i in range(0, len(npcs), per_row):
        row: list[RenderableType] = [n.panel(panel_width) for n in npcs[i:i + per_row]]
        grid.add_row(*row, *([""] * (per_row - len(row))))
    return grid


async def _converse(console: Console, runtime: Path, max_tokens: int) -> int:
    async with bridge.connect(runtime_file=runtime, client_name="demo") as client:
        ready = [a.name for a in client.welcome.adapters if a.kind == "text" and a.status == "ready"]
        npcs = [_Npc(name, [name]) for name in ready[:3]] + [_Npc(BASE, [])]
        model = client.welcome.text_model
        console.print(f"model: [bold]{model.name if model else '?'}[/bold] on {model.device if model else '?'}; "
                      f"adapters: {', '.join(ready) or 'none'}")
        console.print(f"question to every NPC at once: [italic]{QUESTION}[/italic]")

        async def ask(npc: _Npc) -> None:
            stream = client.generate(messages=[{"role": "user", "content": QUESTION}], adapters=npc.adapters,
                                     max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=7,
                                     repetition_penalty=1.1)
            try:
                async for piece in stream:
                    npc.text += piece
                    npc.tokens = stream.chunks[-1].tokens
                    live.update(_layout(npcs, console.width))
            except bridge.LoraloomError as exc:
                npc.error = str(exc)
            npc.result = stream.result
            if npc.result is not None:
                npc.tokens = npc.result.completion_tokens
            live.update(_layout(npcs, console.width))

        start = time.perf_counter()
        with Live(_layout(npcs, console.width), console=console, refresh_per_second=12,
                  vertical_overflow="ellipsis") as live:
            await asyncio.gather(*(ask(n) for n in npcs))
        if not console.is_terminal:
            console.line()  # Live ends its last frame with a newline only on a terminal
        elapsed = time.perf_counter() - start
        tokens = sum(n.tokens for n in npcs)
        console.print(f"{len(npcs)} NPCs answered at once, in one batch: {tokens} tokens in {elapsed:.1f} s "
                      f"({tokens / elapsed:.1f} tokens/s)")
        empty = [n.name for n in npcs if n.result is None or n.result.completion_tokens == 0]
        if empty:
            console.print(f"[red]no answer from: {', '.join(empty)}[/red]")
            return 1
        return 0


def _last_log_line(path: Path) -> str:
    """What the daemon said last, without the timestamp and logger columns."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    parts = lines[-1].split(": ", 1)
    return parts[-1][:100]


def _start_daemon(console: Console, model_dir: Path, adapters: Path | None, work: Path) -> subprocess.Popen[bytes]:
    runtime = work / "daemon.json"
    log_path = work / "daemon.log"
    # A small daemon: 4 sequences of 1,024 tokens and 4 LoRA slots of rank 16 are all the demo uses.
    # `--token=` joined: a URL-safe token can start with "-", which argparse would take for an option.
    cmd = [sys.executable, "-m", "daemon", "serve", "--port", "0", "--runtime-file", str(runtime),
           f"--token={secrets.token_urlsafe(16)}", "--text-model", str(model_dir), "--image-model", "none",
           "--max-seqs", "4", "--max-context", "1024", "--lora-slots", "4", "--max-lora-rank", "16",
           "--log-level", "info"]
    if adapters is not None:
        cmd += ["--text-adapters", str(adapters), "--no-watch"]
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    with console.status("starting the daemon") as status:
        while not runtime.exists():
            if proc.poll() is not None or time.monotonic() - start > 300:
                raise RuntimeError(f"the daemon did not start:\n{log_path.read_text(errors='replace')}")
            status.update(f"starting the daemon: {_last_log_line(log_path) or 'importing PyTorch'}")
            time.sleep(0.1)
    console.print(f"daemon ready in {time.monotonic() - start:.1f} s")
    return proc


def run_demo(args: argparse.Namespace) -> int:
    from .engines.text.default_model import ensure_default_text_model

    console = Console(highlight=False)
    if args.text_model == "default":
        try:
            with console.status("preparing the embedded model") as status:
                model_dir = ensure_default_text_model(args.cache_dir, progress=lambda s: status.update(s))
        except FileNotFoundError as exc:
            print(f"loraloom: {exc}", file=sys.stderr)
            return 2
    else:
        model_dir = Path(args.text_model)
    adapters: Path | None = args.adapters or ROOT / "samples" / "adapters"
    if adapters is not None and not adapters.is_dir():
        console.print(f"no adapter folder at {adapters}; the demo runs on the base model only")
        adapters = None
    work = Path(tempfile.mkdtemp(prefix="loraloom-demo-"))
    proc: subprocess.Popen[Any] | None = None
    try:
        proc = _start_daemon(console, model_dir, adapters, work)
        return asyncio.run(_converse(console, work / "daemon.json", args.max_tokens))
    except RuntimeError as exc:
        print(f"loraloom: {exc}", file=sys.stderr)
        return 3
    except bridge.LoraloomError as exc:
        print(f"loraloom: {exc}\n{(work / 'daemon.log').read_text(errors='replace')}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
