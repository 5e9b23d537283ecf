"""Live reload with real watchdog on real folders, through a real daemon and a subscribed client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
from support import ADAPTER_SPECS, serve_command, start_daemon, stop_daemon
from tiny import write_text_adapter

import bridge
from bridge.messages import AdapterEvent

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    base = tmp_path_factory.mktemp("watched")
    folder = base / "adapters"
    folder.mkdir()
    write_text_adapter(folder / "seed", tiny_model_dir, **ADAPTER_SPECS["alpha"])  # type: ignore[arg-type]
    runtime = base / "daemon.json"
    cmd = serve_command(tiny_model_dir, folder, runtime, token="w")
    proc = start_daemon(cmd, runtime, base / "log.txt")
    url = json.loads(runtime.read_text())["url"]
    yield url, folder, tiny_model_dir
    stop_daemon(proc)


async def next_event(events, name: str, timeout: float = 15.0) -> AdapterEvent:
    async def wait() -> AdapterEvent:
        async for e in events:
            if e.adapter.name == name:
                return e
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(wait(), timeout)


async def served_version(client: bridge.Client, name: str) -> int:
    r = await client.complete("Ahoy", adapters=[name], max_tokens=2, temperature=0.0)
    return r.adapter_versions[name]


async def test_add_update_reject_fix_rename_remove(watched) -> None:
    url, folder, model = watched
    async with bridge.connect(url, "w") as client:
        events = client.events()
        # added (written atomically: temp folder + rename)
        write_text_adapter(folder / "npc", model, seed=1)
        e = await next_event(events, "npc")
        assert (e.event, e.adapter.version, e.adapter.status) == ("added", 1, "ready")
        assert await served_version(client, "npc") == 1
        # updated in place, in chunks
        write_text_adapter(folder / ".npc-v2", model, seed=2, atomic=False)
        data = (folder / ".npc-v2" / "adapter_model.safetensors").read_bytes()
        with (folder / "npc" / "adapter_model.safetensors").open("wb") as f:
            for i in range(0, len(data), 1000):
                f.write(data[i:i + 1000])
                f.flush()
                await asyncio.sleep(0.002)
        e = await next_event(events, "npc")
        assert (e.event, e.previous_version, e.adapter.version) == ("updated", 1, 2)
        assert await served_version(client, "npc") == 2
        # a truncated file is rejected; version 2 keeps serving
        (folder / "npc" / "adapter_model.safetensors").write_bytes(data[:500])
        e = await next_event(events, "npc")
        assert e.event == "rejected" and "truncated" in (e.reason or "") and e.adapter.version == 2
        assert await served_version(client, "npc") == 2
        listed = {a.name: a for a in await client.adapters()}
        assert listed["npc"].status == "ready" and "truncated" in (listed["npc"].error or "")
        # a shape mismatch (an adapter for another model) is rejected too
        other = folder.parent / "other-model"
        if not other.exists():
            from tiny import build_tiny_model

            build_tiny_model(other, hidden=32, heads=2, kv_heads=1)
        write_text_adapter(folder / ".wrong", other, seed=3, atomic=False)
        tmp = folder / "npc" / ".adapter_model.safetensors.tmp"
        shutil.copy(folder / ".wrong" / "adapter_model.safetensors", tmp)
        os.replace(tmp, folder / "npc" / "adapter_model.safetensors")
        e = await next_event(events, "npc")
        assert e.event == "rejected" and "do not fit this base model" in (e.reason or "")
        # fixing it (temp file + rename, the way editors save) makes it live again
        shutil.copy(folder / ".npc-v2" / "adapter_model.safetensors", tmp)
        (folder / ".npc-v2" / "adapter_model.safetensors").write_bytes(
            (folder / ".npc-v2" / "adapter_model.safetensors").read_bytes())
        write_text_adapter(folder / ".npc-v3", model, seed=4, atomic=False)
        shutil.copy(folder / ".npc-v3" / "adapter_model.safetensors", tmp)
        os.replace(tmp, folder / "npc" / "adapter_model.safetensors")
        e = await next_event(events, "npc")
        assert (e.event, e.adapter.version) == ("updated", 3) and e.adapter.error is None
        # rename: the old name is removed, the new one added
        os.rename(folder / "npc", folder / "npc_renamed")
        got = {}
        for _ in range(2):
            e = await asyncio.wait_for(events.__anext__(), 15)
            got[e.adapter.name] = e.event
        assert got == {"npc": "removed", "npc_renamed": "added"}
        with pytest.raises(bridge.AdapterError) as info:
            await served_version(client, "npc")
        assert info.value.code == bridge.ErrorCode.UNKNOWN_ADAPTER
        # removed
        shutil.rmtree(folder / "npc_renamed")
        e = await next_event(events, "npc_renamed")
        assert e.event == "removed" and e.adapter.status == "removed"
        await events.aclose()


async def test_ignored_names_and_broken_new_adapter(watched) -> None:
    url, folder, model = watched
    async with bridge.connect(url, "w") as client:
        events = client.events()
        write_text_adapter(folder / "broken", model, seed=5, atomic=False)
        (folder / "broken" / "adapter_config.json").write_text("{oops")
        (folder / "notes.txt~").write_text("editor backup")
        e = await next_event(events, "broken")
        assert e.event == "rejected" and "not valid JSON" in (e.reason or "")
        with pytest.raises(bridge.AdapterError) as info:
            await served_version(client, "broken")
        assert info.value.code == bridge.ErrorCode.ADAPTER_UNAVAILABLE
        names = {a.name for a in await client.adapters()}
        assert "notes.txt~" not in names and "broken" in names
        await events.aclose()


async def test_burst_of_rewrites_while_streaming(watched) -> None:
    """50 rapid rewrites during four streams: no request fails, no torn version is served, and the
    final live version holds the last content written."""
    url, folder, model = watched
    seed_dir = folder / "burst"
    write_text_adapter(seed_dir, model, seed=100)
    versions = []
    for i in range(50):
        d = folder.parent / f"burst-src-{i}"
        if not d.exists():
            write_text_adapter(d, model, seed=200 + i, atomic=False)
        versions.append(d)
    async with bridge.connect(url, "w") as client:
        for _ in range(100):
            if "burst" in {a.name for a in await client.adapters() if a.status == "ready"}:
                break
            await asyncio.sleep(0.1)

        async def stream() -> bridge.TextStream:
            s = client.generate("Ahoy matey", adapters=["burst"], max_tokens=60, temperature=0.7, seed=1)
            async for _ in s:
                pass
            return s

        streams = [asyncio.create_task(stream()) for _ in range(4)]
        for d in versions:  # rewrite both files in place, several times a second
            shutil.copy(d / "adapter_model.safetensors", seed_dir / "adapter_model.safetensors")
            await asyncio.sleep(0.02)
        done = await asyncio.gather(*streams)
        assert all(s.result is not None and s.result.finish_reason in ("length", "stop") for s in done)
        import hashlib

        last = versions[-1]
        want = hashlib.sha256((seed_dir / "adapter_config.json").read_bytes()
                              + (last / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
        for _ in range(100):
            info = {a.name: a for a in await client.adapters()}["burst"]
            if info.hash == want:
                break
            await asyncio.sleep(0.1)
        assert info.hash == want and info.status == "ready"
        assert await served_version(client, "burst") == info.version
