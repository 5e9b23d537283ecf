"""The Python client reconnecting: a real daemon stopped and another started on a new port and token
(the same runtime file), a real client that finds it again; without `reconnect`, nothing changes."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from daemon_helpers import health
from support import make_adapter_dir, serve_command, start_daemon, stop_daemon

import bridge
from bridge.errors import ConnectionClosed, ShuttingDown

pytestmark = pytest.mark.timeout(240)


def _start(model: Path, adapters: Path, runtime: Path, log: Path, token: str):  # type: ignore[no-untyped-def]
    return start_daemon(serve_command(model, adapters, runtime, token=token), runtime, log)


async def test_the_client_finds_a_restarted_daemon_and_keeps_its_subscription_and_budget(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    adapters = make_adapter_dir(tmp_path / "adapters", tiny_model_dir)
    runtime = tmp_path / "runtime.json"
    first = _start(tiny_model_dir, adapters, runtime, tmp_path / "a.log", "token-a")
    second = None
    states: list[str] = []
    try:
        first_url = json.loads(runtime.read_text())["url"]
        async with bridge.connect(runtime_file=runtime, reconnect=60, on_connection=states.append) as client:
            assert (await client.complete("Ahoy", adapters=["alpha"], max_tokens=4, temperature=0.0)).text
            await client.set_budget(duty_cap=0.5)
            events = client.events()
            stream = client.generate("Tell me a long tale of the sea", max_tokens=200, temperature=0.9, seed=3)
            parts = [await stream.__anext__()]
            await asyncio.to_thread(stop_daemon, first)
            # A stream in flight ends with the daemon: told it is shutting down (SIGTERM), or closed.
            with pytest.raises((ShuttingDown, ConnectionClosed)):
                async for text in stream:
                    parts.append(text)
            assert not client.connected and states == ["disconnected"]

            # A request started while the daemon is away waits for the next one (new port, new token).
            asked = asyncio.ensure_future(client.complete("Who goes there?", adapters=["beta"], max_tokens=4,
                                                          temperature=0.0))
            await asyncio.sleep(0.5)
            assert not asked.done()
            second = await asyncio.to_thread(_start, tiny_model_dir, adapters, runtime, tmp_path / "b.log",
                                             "token-b")
            result = await asyncio.wait_for(asked, 60)
            assert result.text and client.connected and client.reconnects == 1
            assert states == ["disconnected", "reconnected"]
            url = json.loads(runtime.read_text())["url"]
            assert url != first_url

            deadline = time.monotonic() + 10  # the budget was sent again to the new daemon
            while not health(url)["gpu_budget"]["set_by_client"] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert health(url)["gpu_budget"]["duty_cap"] == 0.5

            shutil.copytree(adapters / "alpha", adapters / "delta")  # the subscription too
            event = await asyncio.wait_for(events.__anext__(), 30)
            while event.adapter.name != "delta":
                event = await asyncio.wait_for(events.__anext__(), 30)
            assert event.event == "added", event
    finally:
        stop_daemon(first)
        if second is not None:
            stop_daemon(second)


async def test_a_generation_the_daemon_had_not_answered_is_sent_again(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A daemon killed outright (no `shutting_down`): the stream it was answering fails, the request
    it had queued and said nothing of yet is sent to the next daemon and answered there."""
    adapters = make_adapter_dir(tmp_path / "adapters", tiny_model_dir)
    runtime = tmp_path / "runtime.json"
    extra = ["--max-seqs", "1"]  # the second request waits behind the first
    first = start_daemon(serve_command(tiny_model_dir, adapters, runtime, token="token-k", extra=extra), runtime,
                         tmp_path / "k.log")
    second = None
    try:
        async with bridge.connect(runtime_file=runtime, reconnect=60) as client:
            await client.set_budget(duty_cap=0.05)  # slow steps: the first request is still running at the kill
            running = client.generate("Tell me a long tale of the sea", max_tokens=200)
            await running.__anext__()
            queued = asyncio.ensure_future(client.complete("Who goes there?", adapters=["gamma"], max_tokens=4,
                                                           temperature=0.0))
            await asyncio.sleep(0.5)
            assert not queued.done()
            first.kill()
            await asyncio.to_thread(first.wait)
            with pytest.raises(ConnectionClosed):
                async for _ in running:
                    pass
            second = await asyncio.to_thread(
                start_daemon, serve_command(tiny_model_dir, adapters, runtime, token="token-l", extra=extra), runtime,
                tmp_path / "l.log")
            result = await asyncio.wait_for(queued, 60)
            assert result.finish_reason in ("stop", "length") and result.completion_tokens >= 1
            assert client.reconnects == 1
    finally:
        stop_daemon(first)
        if second is not None:
            stop_daemon(second)


async def test_reconnecting_gives_up_after_its_time_and_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapters = make_adapter_dir(tmp_path / "adapters", tiny_model_dir)
    runtime = tmp_path / "runtime.json"
    proc = _start(tiny_model_dir, adapters, runtime, tmp_path / "d.log", "token-d")
    states: list[str] = []
    try:
        client = await bridge.connect(runtime_file=runtime, reconnect=1.5, on_connection=states.append)
        await asyncio.to_thread(stop_daemon, proc)
        started = time.monotonic()
        with pytest.raises(ConnectionClosed, match="could not reconnect"):
            await client.complete("Ahoy", max_tokens=4)
        assert time.monotonic() - started < 10 and states == ["disconnected", "closed"]
        assert not client.connected
        await client.close()
    finally:
        stop_daemon(proc)


async def test_without_reconnect_a_lost_daemon_fails_requests_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapters = make_adapter_dir(tmp_path / "adapters", tiny_model_dir)
    runtime = tmp_path / "runtime.json"
    proc = _start(tiny_model_dir, adapters, runtime, tmp_path / "e.log", "token-e")
    try:
        async with bridge.connect(runtime_file=runtime) as client:
            await asyncio.to_thread(stop_daemon, proc)
            await asyncio.sleep(0.5)
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await client.complete("Ahoy", max_tokens=4)
            assert time.monotonic() - started < 2 and client.reconnects == 0
    finally:
        stop_daemon(proc)
