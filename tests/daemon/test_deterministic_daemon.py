"""`loraloom serve --deterministic`: a seeded line is the same text whatever the daemon serves beside
it (the engine's own tests check the logits to the bit; this one checks the setting reaches it)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from daemon_helpers import health
from support import LiveDaemon, start_daemon, stop_daemon

import bridge


async def test_a_seeded_line_is_the_same_beside_any_other_traffic(live_daemon: LiveDaemon,
                                                                    tmp_path: Path) -> None:
    runtime = tmp_path / "daemon.json"
    proc = start_daemon(live_daemon.serve_command(runtime, extra=["--deterministic"]), runtime, tmp_path / "log")
    try:
        url = json.loads(runtime.read_text())["url"]
        assert health(url)["text_engine"]["kernels"] == "invariant"
        line = dict(prompt="Ahoy! Who goes there?", adapters=[("beta", 0.7), ("alpha", 0.5)], seed=7,
                    temperature=0.9, max_tokens=24)
        async with bridge.connect(url, live_daemon.token) as client:
            alone = await client.complete(**line)
            for crowd in (3, 7):
                others = [client.complete(prompt=f"Crew member {i} reports", adapters=["gamma" if i % 2 else "beta"],
                                          seed=i, temperature=1.0, max_tokens=10 + i) for i in range(crowd)]
                results = await asyncio.gather(*others[:crowd // 2], client.complete(**line), *others[crowd // 2:])
                assert results[crowd // 2].text == alone.text, crowd
    finally:
        stop_daemon(proc)

