"""One bad request never touches another, proven against a real daemon: boundary values, fuzzed
frames, 200 clients at once, a rewrite storm under load, a 1 MiB prompt, header abuse.

Each test prints its figures (frames, clients, rewrites, failures) with `-s` or in the summary.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemon_helpers import health, raw_connect, recv, recv_until, send
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import make_adapter_dir, serve_command, start_daemon, stop_daemon
from tiny import write_text_adapter

import bridge
from bridge import messages as m
from bridge.codec import encode

pytestmark = pytest.mark.timeout(300)
TOKEN = "hard"


@pytest.fixture(scope="module")
def hard_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    base = tmp_path_factory.mktemp("hard")
    adapters = make_adapter_dir(base / "adapters", tiny_model_dir)
    write_text_adapter(adapters / "storm", tiny_model_dir, rank=4, targets=("q_proj", "v_proj"), seed=100)
    runtime = base / "daemon.json"
    cmd = serve_command(tiny_model_dir, adapters, runtime, token=TOKEN,
                        extra=["--max-frame-bytes", str(2 * 2**20), "--reload-debounce-ms", "100"])
    cmd[cmd.index("--max-seqs") + 1] = "32"
    proc = start_daemon(cmd, runtime, base / "log.txt")
    yield json.loads(runtime.read_text())["url"], adapters, tiny_model_dir, base / "log.txt"
    stop_daemon(proc)


def figures(**values: Any) -> None:
    print("figures:", ", ".join(f"{k}={v}" for k, v in values.items()))


async def _stream(url: str, seed: int, max_tokens: int = 24, adapters: tuple[str, ...] = ()) -> tuple[str, str]:
    """One request; (joined chunks, result text)."""
    async with bridge.connect(url, TOKEN) as client:
        stream = client.generate("Once upon a time", adapters=list(adapters), max_tokens=max_tokens,
                                 temperature=0.9, seed=seed)
        pieces = [p async for p in stream]
        assert stream.result is not None
        return "".join(pieces), stream.result.text


# ---------------------------------------------------------------- boundary values

GOOD = {"type": "generate", "id": "b", "prompt": "Ahoy", "max_tokens": 2}
BOUNDARIES: list[tuple[dict[str, Any], str]] = [
    ({"top_k": 2**63}, "bad_message"), ({"top_k": 2**64 - 1}, "bad_message"), ({"top_k": -1}, "bad_message"),
    ({"top_k": 2**31 - 1}, "ok"), ({"seed": 2**63}, "bad_message"), ({"seed": -1}, "bad_message"),
    ({"seed": 2**63 - 1}, "ok"), ({"max_tokens": 0}, "bad_message"), ({"max_tokens": 2**31}, "bad_message"),
    ({"max_tokens": 5000}, "invalid_parameter"), ({"temperature": math.nan}, "bad_message"),
    ({"temperature": math.inf}, "bad_message"), ({"temperature": -0.1}, "bad_message"),
    ({"temperature": 5.01}, "bad_message"), ({"top_p": 0.0}, "bad_message"), ({"top_p": 1.5}, "bad_message"),
    ({"repetition_penalty": 0.0}, "bad_message"), ({"repetition_penalty": 5.5}, "bad_message"),
    ({"adapters": [{"name": "alpha"}] * 17}, "bad_message"), ({"adapters": [{"name": "alpha"}] * 5},
                                                               "invalid_parameter"),
    ({"adapters": [{"name": "alpha", "scale": 9}]}, "bad_message"),
    ({"adapters": [{"name": "alpha", "scale": math.nan}]}, "bad_message"),
    ({"adapters": [{"name": "../alpha"}]}, "bad_message"), ({"adapters": [{"name": "ghost"}]}, "unknown_adapter"),
    ({"stop": ["x"] * 17}, "bad_message"), ({"stop": ["x" * 257]}, "bad_message"), ({"stop": [""]}, "bad_message"),
    ({"prompt": None, "messages": []}, "bad_message"), ({"messages": [{"role": "user", "content": "x"}]},
                                                        "bad_message"),
    ({"prompt": None, "messages": [{"role": "tool", "content": "x"}]}, "bad_message"),
    ({"id": "x" * 65}, "bad_message"), ({"extra_field": 2**64 - 1}, "bad_message"),
    ({"prompt": "x" * 4000}, "prompt_too_long"),
    ({"type": "generate_image", "prompt": "x", "width": 2**40, "max_tokens": None}, "bad_message"),
    ({"type": "generate_image", "prompt": "x", "steps": 0, "max_tokens": None}, "bad_message"),
    ({"type": "generate_image", "prompt": "x", "count": 65, "max_tokens": None}, "bad_message"),
    ({"type": "generate_image", "prompt": "x", "guidance": math.inf, "max_tokens": None}, "bad_message"),
    ({"type": "generate_image", "prompt": "x", "max_tokens": None}, "model_unavailable"),
]


def _frame(overrides: dict[str, Any], index: int) -> dict[str, Any]:
    frame = {**GOOD, "id": f"b{index}", **overrides}
    return {k: v for k, v in frame.items() if v is not None}


async def test_boundary_values_get_their_codes_while_another_client_streams(hard_daemon) -> None:
    url = hard_daemon[0]
    expected = await _stream(url, seed=3, max_tokens=60)
    other = asyncio.ensure_future(_stream(url, seed=3, max_tokens=60))
    ws = await raw_connect(url, TOKEN)
    got = []
    for i, (overrides, _code) in enumerate(BOUNDARIES):
        frame = _frame(overrides, i)
        await send(ws, frame)
        events = await recv_until(ws, lambda e: e.type in ("result", "error"), timeout=30)
        final = events[-1]
        got.append((overrides, "ok" if final.type == "result" else final.code))
        if "id" in overrides and len(overrides["id"]) > 64:
            assert final.id is None  # an unreadable id is never echoed
        else:
            assert final.id == frame["id"]
    await ws.close()
    assert await other == expected, "the other client's stream changed"
    wrong = [(o, c, want) for (o, c), (_, want) in zip(got, BOUNDARIES, strict=True) if c != want]
    figures(boundary_frames=len(BOUNDARIES), wrong=len(wrong))
    assert wrong == []


# ---------------------------------------------------------------- fuzzing

_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
_scalars = st.one_of(st.none(), st.booleans(), _ints,
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.binary(max_size=30))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
_fields = ["id", "prompt", "messages", "adapters", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
           "stream", "repetition_penalty", "width", "height", "steps", "count", "guidance", "topics", "token",
           "protocol", "name", "scale", "role", "content"]
_types = st.sampled_from(["generate", "generate_image", "cancel", "ping", "list_adapters", "subscribe", "hello",
                          "chunk", "result", "nope", ""]) | _ints | st.none()
_maps = st.fixed_dictionaries({"type": _types}, optional={f: _values for f in _fields}).map(
    lambda d: {k: v for k, v in d.items() if not (k == "type" and v is None)})


def _packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# Close to valid requests, so that some run and the rest fail on one value.
_near_valid = st.fixed_dictionaries(
    {"type": st.just("generate"), "id": st.text(min_size=1, max_size=8), "prompt": st.text(max_size=40)},
    optional={"max_tokens": st.integers(-1, 40) | _ints, "temperature": st.floats(-1, 6) | st.floats(),
              "top_k": st.integers(-1, 50) | _ints, "top_p": st.floats(-0.1, 1.1), "seed": st.integers(-1, 2**64 - 1),
              "stop": st.lists(st.text(max_size=3), max_size=3), "stream": st.booleans(),
              "adapters": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["alpha", "beta", "x/y", ""])},
                                                          optional={"scale": st.floats(-9, 9)}), max_size=3)})
_frames = st.one_of(_maps.map(_packed), _near_valid.map(_packed), st.binary(max_size=64), _values.map(_packed))


class _View:
    def welcome(self) -> m.Welcome:
        limits = m.Limits(max_frame_bytes=1 << 20, max_inflight_per_connection=64, max_prompt_tokens=100,
                          max_new_tokens=100, max_adapters_per_request=4)
        return m.Welcome(protocol=m.PROTOCOL_VERSION, server="fuzz", limits=limits)

    def adapter_list(self) -> list[m.AdapterInfo]:
        return []

    def limits(self) -> m.Limits:
        return self.welcome().limits


_session_frames = [0]


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=_frames)
def test_every_fuzzed_frame_is_answered_by_the_session(frame: bytes) -> None:
    """Sans-I/O: any bytes after a handshake give an answer (an error, a reply or a request start),
    never an exception."""
    from daemon.session import Send, Session, Start

    s = Session(_View(), 1, token="t")
    s.receive(encode(m.Hello(protocol=m.PROTOCOL_VERSION, token="t")))
    actions = s.receive(frame)
    _session_frames[0] += 1
    assert actions and all(isinstance(a, Send | Start) for a in actions), actions
    if _session_frames[0] % 1000 == 0:
        figures(session_frames=_session_frames[0])


class _Baseline:
    """A well-behaved client streaming the same seeded request again and again, on its own loop."""

    def __init__(self, url: str, expected: tuple[str, str]) -> None:
        self.url, self.expected = url, expected
        self.runs = 0
        self.mismatches: list[Any] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)
        self.thread.start()

    async def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                got = await _stream(self.url, seed=11)
            except Exception as exc:
                got = ("error", repr(exc))  # type: ignore[assignment]
            self.runs += 1
            if got != self.expected:
                self.mismatches.append(got)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)


def test_fuzzed_frames_against_the_daemon_are_all_answered(hard_daemon) -> None:
    """Real daemon, one connection per example: every frame is answered in order (a ping after each
    proves the answer came first), the connection survives, a concurrent stream stays unchanged."""
    url = hard_daemon[0]
    baseline = _Baseline(url, asyncio.run(_stream(url, seed=11)))
    counts = {"frames": 0, "errors": 0, "requests": 0}

    async def exchange(frames: list[bytes]) -> None:
        ws = await raw_connect(url, TOKEN)
        started: set[str] = set()
        for i, frame in enumerate(frames):
            await ws.send(frame)
            await send(ws, {"type": "ping", "id": f"probe-{i}"})
            events = await recv_until(ws, lambda e, i=i: e.type == "pong" and e.id == f"probe-{i}", timeout=30)
            answered = [e for e in events if e.type != "pong" and getattr(e, "id", "") not in started]
            errors = [e for e in answered if e.type == "error"]
            counts["frames"] += 1
            counts["errors"] += bool(errors)
            if not errors:  # a valid request: its answers come later; a reply (adapters) came now
                data = msgpack.unpackb(frame, raw=False)
                if data.get("type") in ("generate", "generate_image"):
                    started.add(data["id"])
                    counts["requests"] += 1
                else:
                    assert answered, f"no answer to {data!r}"
        for rid in started:  # every request that started ends
            await ws.send(encode(m.Cancel(id=rid)))
        pending = set(started)
        while pending:
            event = await recv(ws, timeout=60)
            if event.type in ("result", "image_result", "error") and getattr(event, "id", None) in pending:
                pending.discard(event.id)
        await ws.close()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames=st.lists(_frames, min_size=10, max_size=40))
    def run(frames: list[bytes]) -> None:
        asyncio.run(exchange(frames))

    try:
        run()
    finally:
        baseline.finish()
    alive = health(url)
    figures(daemon_frames=counts["frames"], refused=counts["errors"], started=counts["requests"],
            baseline_runs=baseline.runs, baseline_mismatches=len(baseline.mismatches))
    assert counts["frames"] > 1000 and counts["requests"] > 0 and alive["status"] == "ok"
    assert baseline.runs > 0 and baseline.mismatches == []


# ---------------------------------------------------------------- load

async def test_two_hundred_clients_stream_at_once(hard_daemon) -> None:
    url = hard_daemon[0]
    results = await asyncio.gather(*(_stream(url, seed=i, max_tokens=12, adapters=(["alpha", "beta", "gamma"][i % 3],)
                                             if i % 4 else ()) for i in range(200)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    mismatched = [r for r in results if not isinstance(r, BaseException) and r[0] != r[1]]
    figures(clients=200, complete=200 - len(failed), failed=len(failed), text_mismatches=len(mismatched))
    assert failed == [] and mismatched == []


# ---------------------------------------------------------------- a rewrite storm under load

def _content(model: Path, tmp: Path, seed: int) -> tuple[bytes, bytes]:
    folder = write_text_adapter(tmp / f"s{seed}", model, rank=4, targets=("q_proj", "v_proj"), seed=seed)
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


def _hash(config: bytes, weights: bytes) -> str:
    return hashlib.sha256(config + weights).hexdigest()[:16]


def _storm(folder: Path, model: Path, tmp: Path, rounds: int) -> tuple[set[str], int]:
    """Rewrites of `folder` in every way an editor saves; returns the hashes of the complete contents."""
    good: set[str] = set()
    writes = 0
    for r in range(rounds):
        config, weights = _content(model, tmp, 200 + r)
        kind = r % 4
        if kind == 0:  # a temporary folder renamed into place
            staging = folder.with_name(f".{folder.name}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            (staging / "adapter_config.json").write_bytes(config)
            (staging / "adapter_model.safetensors").write_bytes(weights)
            old = folder.with_name(f".{folder.name}.old")
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old)
        elif kind == 1:  # in place, in 4 KiB chunks
            with (folder / "adapter_model.safetensors").open("wb") as f:
                for i in range(0, len(weights), 4096):
                    f.write(weights[i:i + 4096])
                    f.flush()
        elif kind == 2:  # a corrupt save (truncated), then the good one
            (folder / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
            time.sleep(0.3)
            (folder / "adapter_model.safetensors").write_bytes(weights)
        else:  # in place, same size, pausing 0.5 s (5 debounces) halfway with the file open
            with (folder / "adapter_model.safetensors").open("r+b") as f:
                f.write(weights[: len(weights) // 2])
                f.flush()
                time.sleep(0.5)
                f.write(weights[len(weights) // 2:])
        good.add(_hash((folder / "adapter_config.json").read_bytes(), weights))
        writes += 1
        time.sleep(0.35)
    return good, writes


async def test_rewrite_storm_under_load_serves_no_torn_version(hard_daemon, tmp_path: Path) -> None:
    url, adapters, model, _ = hard_daemon
    folder = adapters / "storm"
    first = _hash((folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes())
    live: dict[int, str | None] = {}
    async with bridge.connect(url, TOKEN) as watcher:
        events = watcher.events()
        await watcher.subscribe()
        stop = asyncio.Event()
        outcomes: list[Any] = []

        async def load(i: int) -> None:
            async with bridge.connect(url, TOKEN) as client:
                while not stop.is_set():
                    try:
                        r = await client.complete("Ahoy", adapters=["storm", "alpha:0.5"] if i % 2 else ["storm"],
                                                  max_tokens=6, temperature=0.0)
                        outcomes.append(r.adapter_versions["storm"])
                    except bridge.LoraloomError as exc:
                        outcomes.append(exc)

        async def collect() -> None:
            async for e in events:
                if e.adapter.name == "storm" and e.event in ("added", "updated"):
                    live[e.adapter.version or 0] = e.adapter.hash

        collector = asyncio.ensure_future(collect())
        workers = [asyncio.ensure_future(load(i)) for i in range(6)]
        good, writes = await asyncio.to_thread(_storm, folder, model, tmp_path, 12)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
        collector.cancel()
        await events.aclose()
        final = (await watcher.adapters())
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    served = {o for o in outcomes if isinstance(o, int)}
    live[1] = first
    torn = {v: h for v, h in live.items() if h not in good | {first}}
    figures(rewrites=writes, requests=len(outcomes), failures=len(failures), versions_live=len(live),
            versions_served=len(served), torn=len(torn))
    assert failures == [] and torn == {}
    assert served <= set(live), "a version was served that never went live"
    storm = next(a for a in final if a.name == "storm")
    assert storm.hash in good and storm.status == "ready"


# ---------------------------------------------------------------- the event loop and the small ones

async def test_a_megabyte_prompt_is_refused_from_its_length_while_others_stream(hard_daemon) -> None:
    """1 MiB of prompt: refused as too long from its byte count (never tokenised, never on the event
    loop), while another client's tokens keep coming."""
    url = hard_daemon[0]
    arrivals: list[float] = []
    going = asyncio.Event()

    async def streamer() -> None:
        async with bridge.connect(url, TOKEN) as client:
            async for _ in client.generate("Once upon a time", max_tokens=240, temperature=0.9, seed=1):
                arrivals.append(time.perf_counter())
                if len(arrivals) == 5:
                    going.set()

    task = asyncio.ensure_future(streamer())
    ws = await raw_connect(url, TOKEN)
    await asyncio.wait_for(going.wait(), 30)
    start = time.perf_counter()
    await send(ws, {"type": "generate", "id": "big", "prompt": "dragon " * (2**20 // 7)})
    err = await recv(ws, timeout=30)
    end = time.perf_counter()
    await ws.close()
    await task
    window = [b - a for a, b in itertools.pairwise(arrivals) if b >= start and a <= end]
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    figures(prompt_bytes=2**20, refused_after_ms=round((end - start) * 1000, 1),
            gap_while_refusing_ms=round(max(window, default=0.0) * 1000, 1),
            gap_median_ms=round(gaps[len(gaps) // 2] * 1000, 1), tokens_while_refusing=len(window))
    assert err.type == "error" and err.code == "prompt_too_long" and "at least" in err.message
    assert max(window, default=0.0) < 0.25, "another client's tokens stalled while the prompt was refused"


async def test_healthz_counts_connections_and_subscriptions(hard_daemon) -> None:
    url = hard_daemon[0]
    before = health(url)
    clients = [await bridge.connect(url, TOKEN) for _ in range(3)]
    await clients[0].subscribe()
    during = health(url)
    for c in clients:
        await c.close()
    await asyncio.sleep(0.2)
    after = health(url)
    assert during["connections"] == before["connections"] + 3
    assert during["subscriptions"] == before["subscriptions"] + 1
    assert after["connections"] == before["connections"] and after["subscriptions"] == before["subscriptions"]


def test_two_origin_headers_get_a_400_not_a_traceback(hard_daemon) -> None:
    url = hard_daemon[0]
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    request = (f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               "Origin: http://a.example\r\nOrigin: http://b.example\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request.encode())
        reply = s.recv(4096).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 400"), reply
    assert "Traceback" not in hard_daemon[3].read_text() and health(url)["status"] == "ok"
