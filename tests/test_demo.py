"""`loraloom demo`, the newcomer's main job, run in a real pseudo-terminal and read off the screen.

The live view must stay right where the old one broke: started at the bottom of a full screen
(as after a chained `pip install`), at 80x24 and at 160x50. The screen is a terminal emulator
(pyte) fed with everything the demo wrote.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT
from terminal import TerminalRun, run_in_terminal

SUMMARY = "NPCs answered at once, in one batch"
TOP, SIDE, BOTTOM = "╭╮", "│", "╰╯"


def _demo(*extra: str) -> list[str]:
    return [sys.executable, "-m", "daemon", "demo", *extra]


def check_screen(run: TerminalRun, names: list[str], columns: int) -> dict[str, str]:
    """Every panel drawn once, bordered cleanly, then the summary; returns each panel's text."""
    assert run.returncode == 0, run.raw.decode(errors="replace")[-3000:]
    lines = run.all_lines
    for name in names:
        tops = [ln for ln in lines if f"╭─ {name}" in ln]
        assert len(tops) == 1, f"panel '{name}' drawn {len(tops)} times:\n" + "\n".join(lines[-60:])
    summary = [i for i, ln in enumerate(run.screen) if SUMMARY in ln]
    assert len(summary) == 1 and sum(SUMMARY in ln for ln in lines) == 1, "\n".join(run.screen)
    first = next(i for i, ln in enumerate(run.screen) if ln.lstrip().startswith("╭"))
    block = run.screen[first:summary[0]]
    texts: dict[str, list[str]] = {}
    for line in block:
        assert len(line) <= columns
        body = line.strip()
        # A redraw that left stale text behind, or a wrapped line, breaks the borders.
        assert body[0] in TOP[0] + SIDE + BOTTOM[0] and body[-1] in TOP[1] + SIDE + BOTTOM[1], \
            f"a broken panel line: {line!r}\n" + "\n".join(block)
        assert line.count("╭") == line.count("╮") and line.count("╰") == line.count("╯"), line
    for name in names:
        col = next(ln.index(f"╭─ {name}") for ln in block if f"╭─ {name}" in ln)
        row = next(i for i, ln in enumerate(block) if f"╭─ {name}" in ln)
        inner: list[str] = []
        for ln in block[row + 1:]:
            cell = ln[col:]
            if cell.startswith("╰"):
                assert "done" in cell, f"panel '{name}' did not finish: {cell!r}"
                break
            inner.append(cell[1:].split("│", 1)[0].strip())
        texts[name] = " ".join(inner).strip()
    return texts


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("columns", "lines"), [(80, 24), (160, 50)])
def test_demo_redraws_cleanly_from_the_bottom_of_a_full_screen(columns: int, lines: int, tiny_model_dir: Path,
                                                                adapter_copy: Path) -> None:
    """On the tiny model: panels drawn once each with clean borders and their final text, then one summary line."""
    run = run_in_terminal(_demo("--text-model", str(tiny_model_dir), "--adapters", str(adapter_copy),
                                "--max-tokens", "40"), columns=columns, lines=lines, prefill=lines + 5, cwd=ROOT)
    texts = check_screen(run, ["alpha", "beta", "gamma", "base model"], columns)
    assert all(texts.values()), texts
    assert "\x1b" not in "".join(run.screen)


@pytest.mark.timeout(300)
def test_demo_without_a_terminal_prints_the_panels_once(tiny_model_dir: Path, adapter_copy: Path) -> None:
    """Piped (no terminal): no cursor movement, the final panels once, the summary."""
    r = subprocess.run(_demo("--text-model", str(tiny_model_dir), "--adapters", str(adapter_copy),
                             "--max-tokens", "12"), capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\x1b[" not in r.stdout
    assert r.stdout.count("╭─ alpha") == 1 and r.stdout.count(SUMMARY) == 1, r.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_on_the_embedded_model_in_an_80x24_terminal(smollm2_dir: Path) -> None:
    """The README's main job: three persona adapters and the base model answer in their panels."""
    run = run_in_terminal(_demo("--max-tokens", "32"), columns=80, lines=24, prefill=30, cwd=ROOT, timeout=500)
    samples = sorted(p.name for p in (ROOT / "samples" / "adapters").iterdir() if p.is_dir())
    assert samples, "samples/adapters holds the trained persona adapters"
    screen = "\n".join(run.screen)
    assert "SmolLM2-135M-Instruct" in "\n".join(run.all_lines)
    texts = check_screen(run, [*samples[:3], "base model"], 80)
    assert all(len(t) > 10 for t in texts.values()), screen


def test_the_demo_daemon_starts_with_a_token_that_looks_like_an_option(tiny_model_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL-safe token may start with "-" (1 in 64): the demo must still start its daemon."""
    import io
    import json

    from rich.console import Console

    from daemon import demo

    monkeypatch.setattr(demo.secrets, "token_urlsafe", lambda n: "-looks-like-an-option")
    proc = demo._start_daemon(Console(file=io.StringIO()), tiny_model_dir, None, tmp_path)
    try:
        assert json.loads((tmp_path / "daemon.json").read_text())["token"] == "-looks-like-an-option"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
