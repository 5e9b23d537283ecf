"""The `loraloom` command against a real daemon: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, LiveDaemon

pytestmark = pytest.mark.timeout(120)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=100)


def test_ask_raw_streams_and_exits_0(live_daemon: LiveDaemon) -> None:
    """--raw continues the prompt as text; -v reports the tokens and the adapter versions."""
    r = cli("ask", "--runtime-file", str(live_daemon.runtime_file), "-a", "alpha", "-a", "beta:0.5", "--raw",
            "--max-tokens", "12", "--seed", "3", "-v", "Ahoy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "12 tokens" in r.stderr and "'alpha': 1" in r.stderr and "'beta': 1" in r.stderr


def test_ask_uses_the_chat_template_by_default(live_daemon: LiveDaemon) -> None:
    """Without --raw the prompt is a chat turn: the template's tokens come with it."""
    chat = cli("ask", "--runtime-file", str(live_daemon.runtime_file), "--max-tokens", "2", "-v", "Ahoy")
    raw = cli("ask", "--runtime-file", str(live_daemon.runtime_file), "--max-tokens", "2", "-v", "--raw", "Ahoy")
    assert raw.returncode in (0, 4) and chat.returncode in (0, 4), chat.stderr + raw.stderr

    def prompt_tokens(r: subprocess.CompletedProcess[str]) -> int:
        return int(r.stderr.split("; ")[1].split(" prompt")[0])

    assert prompt_tokens(chat) > prompt_tokens(raw) + 3
    r = cli("ask", "--runtime-file", str(live_daemon.runtime_file), "--raw", "--system", "x", "Ahoy")
    assert r.returncode == 2 and "--system" in r.stderr


def test_ask_says_so_when_the_answer_is_empty(live_daemon: LiveDaemon) -> None:
    """An empty answer is never a silent exit 0: exit 4 and a note on stderr."""
    args = ("ask", "--runtime-file", str(live_daemon.runtime_file), "--raw", "--temperature", "0",
            "--max-tokens", "1", "Gold coins")
    first = cli(*args)
    if first.returncode == 0:  # cut the answer before its only token: nothing is left
        first = cli(*args, "--stop", first.stdout.rstrip("\n"))
    assert first.returncode == 4, first.stdout + first.stderr
    assert "answer was empty" in first.stderr


def test_bad_adapter_scale_blames_the_scale(live_daemon: LiveDaemon) -> None:
    r = cli("ask", "--runtime-file", str(live_daemon.runtime_file), "-a", "alpha:abc", "Hello")
    assert r.returncode == 2 and "scale 'abc' is not a number" in r.stderr, r.stderr


def test_bare_loraloom_lists_its_commands() -> None:
    r = cli()
    assert r.returncode == 2
    for command in ("serve", "ask", "adapters", "image", "train", "demo"):
        assert command in r.stderr


def test_image_on_a_text_only_daemon_says_how_to_get_images(live_daemon: LiveDaemon, tmp_path: Path) -> None:
    r = cli("image", "--runtime-file", str(live_daemon.runtime_file), "a map", "-o", str(tmp_path / "x.png"))
    assert r.returncode == 1 and "--image-model none" in r.stderr and "--image-model default" in r.stderr


def test_ask_with_explicit_url_and_token(live_daemon: LiveDaemon) -> None:
    r = cli("ask", "--url", live_daemon.url, "--token", live_daemon.token, "--system", "You are terse.",
            "--max-tokens", "4", "Hello")
    assert r.returncode == 0, r.stderr


def test_ask_unknown_adapter_exits_1_with_reason(live_daemon: LiveDaemon) -> None:
    r = cli("ask", "--runtime-file", str(live_daemon.runtime_file), "-a", "ghost", "Hello")
    assert r.returncode == 1
    assert "unknown_adapter" in r.stderr and "ghost" in r.stderr and "alpha" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ask_wrong_token_exits_1(live_daemon: LiveDaemon) -> None:
    r = cli("ask", "--url", live_daemon.url, "--token", "nope", "Hello")
    assert r.returncode == 1 and "unauthorized" in r.stderr


def test_ask_without_daemon_exits_3(tmp_path: Path) -> None:
    r = cli("ask", "--runtime-file", str(tmp_path / "none.json"), "Hello")
    assert r.returncode == 3 and "no daemon is running" in r.stderr
    info = {"url": "ws://127.0.0.1:9", "host": "127.0.0.1", "port": 9, "token": "x", "pid": 1, "version": "0",
            "protocol": 1}
    (tmp_path / "stale.json").write_text(json.dumps(info))
    r = cli("ask", "--runtime-file", str(tmp_path / "stale.json"), "Hello")
    assert r.returncode == 3 and "cannot reach the daemon" in r.stderr


def test_ask_bad_option_exits_2(live_daemon: LiveDaemon) -> None:
    r = cli("ask", "--runtime-file", str(live_daemon.runtime_file), "--temperature", "9", "Hello")
    assert r.returncode == 2 and "temperature" in r.stderr and "less than or equal" in r.stderr
    r = cli("ask", "--max-tokens", "many", "Hello")
    assert r.returncode == 2


def test_adapters_lists_name_status_version_rank(live_daemon: LiveDaemon) -> None:
    r = cli("adapters", "--runtime-file", str(live_daemon.runtime_file))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["NAME", "KIND", "STATUS", "VERSION", "RANK"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["beta"][1:5] == ["text", "ready", "1", "8"]
    r = cli("adapters", "--runtime-file", str(live_daemon.runtime_file), "--json")
    assert {a["name"] for a in json.loads(r.stdout)} >= {"alpha", "beta", "gamma"}


def test_serve_refuses_bad_settings() -> None:
    r = cli("serve", "--port", "70000", "--text-model", "none")
    assert r.returncode != 0 and "port" in r.stderr
