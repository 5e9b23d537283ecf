"""`loraloom train`: a PEFT fine-tune on the base model, written atomically into an adapter folder
that a running daemon picks up live."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, serve_command, start_daemon, stop_daemon

import bridge
from daemon.train import load_examples

pytestmark = pytest.mark.timeout(300)


def test_examples_in_both_formats_and_bad_lines(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "arr"}]}\n'
                    "A plain line in the voice.\n\n"
                    '{"text": "Another line."}\n')
    assert [list(e) for e in load_examples(data)] == [["messages"], ["text"], ["text"]]
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="last message must be the assistant's"):
        load_examples(data)
    data.write_text('{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a 'messages' or 'text' field"):
        load_examples(data)


async def test_trained_adapter_goes_live_in_a_running_daemon(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "adapters"
    folder.mkdir()
    runtime = tmp_path / "daemon.json"
    proc = start_daemon(serve_command(tiny_model_dir, folder, runtime, token="t"), runtime, tmp_path / "log.txt")
    try:
        url = json.loads(runtime.read_text())["url"]
        async with bridge.connect(url, "t") as client:
            events = client.events()
            await client.subscribe()
            cmd = [sys.executable, "-m", "daemon", "train", "--base", str(tiny_model_dir), "--data",
                   str(ROOT / "samples" / "personas" / "pirate_quartermaster.jsonl"), "--name", "meg",
                   "--out", str(folder), "--steps", "4", "--batch-size", "2", "--rank", "4", "--device", "cpu"]
            r = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
            assert r.returncode == 0, r.stderr
            assert f"wrote {folder / 'meg'}" in r.stdout
            event = await asyncio.wait_for(events.__anext__(), 20)
            assert (event.event, event.adapter.name, event.adapter.rank) == ("added", "meg", 4)
            assert sorted(p.name for p in (folder / "meg").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
            assert not [p for p in folder.iterdir() if p.name.startswith(".")], "no temporary folder left"
            result = await client.complete("Ahoy", adapters=["meg"], max_tokens=4, temperature=0.0)
            assert result.adapter_versions == {"meg": 1}
            await events.aclose()
    finally:
        stop_daemon(proc)


def test_train_refuses_a_path_as_name(tmp_path: Path, tiny_model_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "daemon", "train", "--base", str(tiny_model_dir), "--data",
                        str(ROOT / "samples" / "personas" / "elven_archivist.jsonl"), "--name", "../evil",
                        "--out", str(tmp_path), "--steps", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "not a valid adapter name" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_without_peft_says_which_extra(tmp_path: Path, tiny_model_dir: Path) -> None:
    """PEFT missing: the command names the extra to install instead of a ModuleNotFoundError."""
    code = ("import sys; sys.modules['peft'] = None; from daemon.cli import main; "
            f"sys.exit(main(['train', '--base', {str(tiny_model_dir)!r}, '--data', 'x.jsonl', '--name', 'a', "
            f"'--out', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and ".[train]" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_train_prints_how_long_it_will_take(tmp_path: Path, tiny_model_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "daemon", "train", "--base", str(tiny_model_dir), "--data",
                        str(ROOT / "samples" / "personas" / "elven_archivist.jsonl"), "--name", "elowen",
                        "--out", str(tmp_path), "--steps", "3", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=200)
    assert r.returncode == 0, r.stderr
    assert "3 steps of 4 examples, about" in r.stderr + r.stdout
    assert "Warning" not in r.stderr, r.stderr
