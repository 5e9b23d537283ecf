"""A real daemon on port 0 with the real client: streaming, cancellation, bad input, security."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest
from daemon_helpers import health, raw_connect, recv, recv_until, send
from support import LiveDaemon, serve_command, start_daemon, stop_daemon
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import bridge

pytestmark = pytest.mark.timeout(180)


async def test_streams_on_several_adapters_at_once(live_daemon: LiveDaemon) -> None:
    """Four NPCs (three adapters and the base model) stream concurrently, each on its own adapter version."""
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        assert {a.name for a in client.welcome.adapters} >= {"alpha", "beta", "gamma"}
        order: list[str] = []

        async def npc(adapters: list[str], key: str):
            stream = client.generate("Ahoy matey", adapters=adapters, max_tokens=24, temperature=0.8, seed=1)
            text = ""
            async for piece in stream:
                order.append(key)
                text += piece
            return stream, text

        results = await asyncio.gather(npc(["alpha"], "a"), npc(["beta:0.5"], "b"), npc(["gamma", "alpha:0.3"], "g"),
                                       npc([], "base"))
    for stream, text in results:
        assert stream.result is not None and stream.result.text == text
        assert stream.result.finish_reason in ("length", "stop")
        assert stream.result.timings.total_ms >= (stream.result.timings.first_token_ms or 0)
    assert results[0][0].result.adapter_versions == {"alpha": 1}
    assert results[2][0].result.adapter_versions == {"gamma": 1, "alpha": 1}
    assert results[3][0].result.adapter_versions == {}
    # Interleaved, not one after the other: some stream got chunks after another's first chunk
    # and before that other one finished.
    first_end = {k: (order.index(k), len(order) - 1 - order[::-1].index(k)) for k in set(order)}
    assert any(first_end[x][0] < first_end[y][1] and first_end[y][0] < first_end[x][1]
               for x in first_end for y in first_end if x != y)


async def test_same_seed_same_text_over_the_wire(live_daemon: LiveDaemon) -> None:
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        a = await client.complete("Gold coins", adapters=["beta"], seed=77, temperature=1.0, max_tokens=16)
        b = await client.complete("Gold coins", adapters=["beta"], seed=77, temperature=1.0, max_tokens=16)
    assert a.text == b.text and a.completion_tokens == b.completion_tokens


async def test_cancel_mid_stream(live_daemon: LiveDaemon) -> None:
    """`cancel` ends a running request with finish_reason cancelled; the connection stays usable."""
    ws = await raw_connect(live_daemon.url, live_daemon.token)
    await send(ws, {"type": "generate", "id": "c1", "prompt": "Hello", "max_tokens": 200, "temperature": 0.5,
                    "seed": 4})
    first = await recv(ws)
    assert first.type == "chunk" and first.id == "c1"
    await send(ws, {"type": "cancel", "id": "c1"})
    events = await recv_until(ws, lambda e: e.type in ("result", "error"))
    assert events[-1].type == "result" and events[-1].finish_reason == "cancelled"
    assert events[-1].completion_tokens < 200
    await send(ws, {"type": "cancel", "id": "c1"})
    err = await recv(ws)
    assert err.type == "error" and err.code == "unknown_request" and err.id == "c1"
    await send(ws, {"type": "ping", "id": "p"})
    assert (await recv(ws)).type == "pong"
    await ws.close()


async def test_client_leaving_the_loop_early_cancels(live_daemon: LiveDaemon) -> None:
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        stream = client.generate("Hello", max_tokens=400, temperature=0.5, seed=4)
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if health(live_daemon.url)["text_engine"]["running"] == 0:
                break
            await asyncio.sleep(0.05)
        assert health(live_daemon.url)["text_engine"]["running"] == 0
        assert await client.ping() > 0


async def test_disconnect_mid_stream_frees_the_sequence(live_daemon: LiveDaemon) -> None:
    ws = await raw_connect(live_daemon.url, live_daemon.token)
    for i in range(3):
        await send(ws, {"type": "generate", "id": f"d{i}", "prompt": "Once upon a time", "max_tokens": 250})
    await recv(ws)
    assert health(live_daemon.url)["text_engine"]["running"] >= 1
    await ws.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and health(live_daemon.url)["text_engine"]["running"]:
        await asyncio.sleep(0.05)
    stats = health(live_daemon.url)["text_engine"]
    assert stats["running"] == 0 and stats["queued"] == 0
    assert stats["kv_blocks_in_use"] == 0  # every block back (full ones stay cached)


@pytest.fixture(scope="module")
def strict_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, live_daemon: LiveDaemon):
    """A daemon with small limits: 2 requests in flight, 4 KiB frames, 256-token context."""
    base = tmp_path_factory.mktemp("strict")
    runtime = base / "daemon.json"
    cmd = serve_command(tiny_model_dir, live_daemon.text_adapter_dir, runtime, token="strict",
                        extra=["--max-inflight", "2", "--max-frame-bytes", "4096", "--max-new-tokens", "300",
                               "--no-watch", "--allow-origin", "http://game.example"])
    proc = start_daemon(cmd, runtime, base / "log.txt")
    yield json.loads(runtime.read_text())["url"]
    stop_daemon(proc)


async def test_bad_input_is_answered_while_another_client_streams(strict_daemon: str) -> None:
    """Every bad frame gets its error code; the offending connection and another client keep working."""
    async with bridge.connect(strict_daemon, "strict") as other:
        stream = other.generate("Gold coins", max_tokens=120, temperature=0.7, seed=5)
        streaming = asyncio.create_task(stream.text())
        ws = await raw_connect(strict_daemon, "strict")
        cases = [
            (b"\xc1\x00", "bad_frame", None),
            (msgpack.packb([1, 2, 3]), "bad_frame", None),
            ({"type": "sing", "id": "x1"}, "bad_message", "x1"),
            ({"type": "generate", "id": "x2", "prompt": 5}, "bad_message", "x2"),
            ({"type": "generate", "id": "x3", "prompt": "a", "mood": "happy"}, "bad_message", "x3"),
            ({"type": "generate", "id": "x4", "prompt": "a", "adapters": [{"name": "ghost"}]}, "unknown_adapter", "x4"),
            ({"type": "generate", "id": "x5", "prompt": "word " * 400}, "prompt_too_long", "x5"),
            ({"type": "generate", "id": "x6", "prompt": "a", "max_tokens": 301}, "invalid_parameter", "x6"),
            ({"type": "generate", "id": "x7", "prompt": "a", "adapters": [{"name": "alpha"}] * 5},
             "invalid_parameter", "x7"),
            ({"type": "generate", "id": "x8", "prompt": "x" * 5000}, "frame_too_large", None),
            ({"type": "hello", "protocol": 1, "token": "strict"}, "bad_message", None),
        ]
        for frame, code, rid in cases:
            await send(ws, frame)
            err = await recv(ws)
            shown = frame if isinstance(frame, dict) else frame[:8]
            assert (err.type, err.code, err.id) == ("error", code, rid), (shown, err)
            assert err.message
        await ws.send("a text frame")
        err = await recv(ws)
        assert err.code == "bad_frame" and "binary" in err.message
        # In-flight limit and duplicate ids.
        await send(ws, {"type": "generate", "id": "y1", "prompt": "Hello", "max_tokens": 200})
        await send(ws, {"type": "generate", "id": "y1", "prompt": "Hello", "max_tokens": 200})
        await send(ws, {"type": "generate", "id": "y2", "prompt": "Hello", "max_tokens": 200})
        await send(ws, {"type": "generate", "id": "y3", "prompt": "Hello", "max_tokens": 200})
        events = await recv_until(ws, lambda e: e.type == "error" and e.id == "y3")
        errors = [(e.id, e.code) for e in events if e.type == "error"]
        assert errors == [("y1", "duplicate_id"), ("y3", "too_many_requests")]
        await send(ws, {"type": "ping", "id": "still-alive"})
        await recv_until(ws, lambda e: e.type == "pong" and e.id == "still-alive")
        await ws.close()
        text = await streaming
        assert stream.result is not None and stream.result.completion_tokens > 0 and text == stream.result.text


async def test_a_giant_frame_closes_only_that_connection(strict_daemon: str) -> None:
    ws = await raw_connect(strict_daemon, "strict")
    await ws.send(b"\x00" * 20000)  # above the hard cap of 4x max_frame_bytes
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    async with bridge.connect(strict_daemon, "strict") as client:
        assert await client.ping() > 0


async def test_handshake_refusals(strict_daemon: str) -> None:
    with pytest.raises(bridge.AuthError) as info:
        await bridge.connect(strict_daemon, "wrong")
    assert info.value.code == bridge.ErrorCode.UNAUTHORIZED
    ws = await raw_connect(strict_daemon, None)
    await send(ws, {"type": "hello", "protocol": 99, "token": "strict"})
    err = await recv(ws)
    assert err.code == "unsupported_version"
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    ws = await raw_connect(strict_daemon, None)
    await send(ws, {"type": "ping", "id": "p"})
    assert (await recv(ws)).code == "handshake_required"


async def test_browser_origins_are_refused_unless_allowed(strict_daemon: str) -> None:
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(strict_daemon, origin="http://evil.example")  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    ws = await raw_connect(strict_daemon, "strict", origin="http://game.example")
    await ws.close()


def test_healthz_and_404(live_daemon: LiveDaemon) -> None:
    h = health(live_daemon.url)
    assert h["status"] == "ok" and h["text_model"]["name"] == "tiny-llama" and h["uptime_s"] > 0
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(live_daemon.url.replace("ws://", "http://") + "/admin", timeout=10)
    assert info.value.code == 404


async def test_shutdown_ends_requests_and_removes_the_runtime_file(tmp_path: Path, tiny_model_dir: Path,
                                                                   live_daemon: LiveDaemon) -> None:
    """SIGTERM: in-flight requests end with `shutting_down`, the runtime file (mode 0600) disappears."""
    runtime = tmp_path / "rt" / "daemon.json"
    proc = start_daemon(serve_command(tiny_model_dir, live_daemon.text_adapter_dir, runtime, token="bye"),
                        runtime, tmp_path / "log.txt")
    info = json.loads(runtime.read_text())
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o600 and info["pid"] == proc.pid and info["token"] == "bye"
    async with bridge.connect(runtime_file=runtime) as client:
        stream = client.generate("Hello", max_tokens=250, temperature=0.5, seed=4)
        await stream.__anext__()
        os.kill(proc.pid, signal.SIGTERM)
        with pytest.raises(bridge.ShuttingDown):
            async for _ in stream:
                pass
    assert proc.wait(20) == 0
    assert not runtime.exists()
    assert "shutting down" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("activity", ["idle", "streaming"])
async def test_sigterm_with_clients_attached_closes_them_all_and_exits(
        activity: str, tmp_path: Path, tiny_model_dir: Path, live_daemon: LiveDaemon) -> None:
    """SIGTERM with clients attached (idle, or streaming on several adapters): every connection is
    closed with 1001 (going away) right away, streams end with `shutting_down`, the process exits
    within a few seconds (no wait on the clients) and removes its runtime file."""
    runtime = tmp_path / "daemon.json"
    proc = start_daemon(serve_command(tiny_model_dir, live_daemon.text_adapter_dir, runtime, token="bye"),
                        runtime, tmp_path / "log.txt")
    client = await bridge.connect(runtime_file=runtime)
    idle = await raw_connect(json.loads(runtime.read_text())["url"], "bye")
    streams = []
    if activity == "streaming":
        streams = [client.generate("Once upon a time", adapters=adapters, max_tokens=250, stop=[], seed=i)
                   for i, adapters in enumerate([["alpha"], ["beta"], []])]
        for stream in streams:
            await stream.__anext__()
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(idle.recv(), 10)
    closed_after = time.monotonic() - started
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    for stream in streams:
        with pytest.raises(bridge.ShuttingDown):
            async for _ in stream:
                pass
    code = await asyncio.to_thread(proc.wait, 20)
    exited_after = time.monotonic() - started
    with pytest.raises(bridge.ConnectionClosed):
        await client.ping()
    await client.close()
    assert code == 0 and not runtime.exists()
    # Bounds against a hang on attached clients, not a speed claim: it takes well under a second here.
    assert closed_after < 5 and exited_after < 5, (closed_after, exited_after)
