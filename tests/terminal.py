"""Run a command in a real pseudo-terminal of a given size and read the screen it leaves (pyte).

`run_in_terminal(argv, columns, lines, prefill=N)` first fills the emulated screen with N lines of
shell history, so the program starts at the bottom of a full screen, as it does after a chained
`pip install`. It returns the screen's final lines, the lines scrolled off above them, and the
raw output.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pyte


@dataclass
class TerminalRun:
    returncode: int
    screen: list[str]  # the visible lines at the end, right-stripped
    history: list[str]  # lines that scrolled off the top, oldest first
    raw: bytes

    @property
    def all_lines(self) -> list[str]:
        return self.history + self.screen


def run_in_terminal(argv: list[str], *, columns: int, lines: int, prefill: int = 0, cwd: Path | None = None,
                    env: dict[str, str] | None = None, timeout: float = 300) -> TerminalRun:
    screen = pyte.HistoryScreen(columns, lines, history=10_000)
    stream = pyte.ByteStream(screen)
    for i in range(prefill):
        stream.feed(f"$ earlier command {i}\r\n".encode())
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    full_env = dict(env or os.environ, TERM="xterm-256color", COLUMNS=str(columns), LINES=str(lines))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=full_env,
                            close_fds=True, start_new_session=True)
    os.close(slave)
    raw = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                so_far = raw.decode(errors="replace")
                raise TimeoutError(f"{argv} did not finish in {timeout} s; output so far:\n{so_far}")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed its side
                    data = b""
                if not data:
                    break
                raw += data
                stream.feed(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    code = proc.wait(timeout=30)
    history = ["".join(ch.data for ch in row.values()).rstrip() if isinstance(row, dict)
               else "".join(row[x].data for x in range(columns)).rstrip() for row in screen.history.top]
    return TerminalRun(code, [line.rstrip() for line in screen.display], history, bytes(raw))
