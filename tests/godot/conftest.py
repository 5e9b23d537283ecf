"""Fixtures of the GDScript suite: one run of godot_addon/tests/ in the real Godot 4.6 web runtime.

See godot_suite.py for what a run does; the tests in test_godot_addon.py assert on its results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import godot_web
from daemon_helpers import health
from godot_cases import shipping_config, structured_config
from godot_suite import (
    ADDON_PROJECT,
    SUITE_TIMEOUT,
    UNKNOWN_ADAPTER,
    ColdDaemon,
    GodotRun,
    SuiteDaemon,
    codec_cases,
    discovery_cases,
    golden_frame_names,
    parse_lines,
    protocol_config,
    python_conversation,
    python_welcome,
    runtime_scripts,
    start_suite_daemon,
    suite_project_settings,
    typed,
)


@pytest.fixture(scope="session")
def godot_tools() -> tuple[Path, str]:
    """The Godot web export and chromium; missing ones fail (CI installs them first)."""
    return godot_web.find_engine_dir(), godot_web.find_chromium()


@pytest.fixture(scope="session")
def godot_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              godot_tools: tuple[Path, str]) -> Iterator[GodotRun]:
    engine_dir, _ = godot_tools
    work = tmp_path_factory.mktemp("godot")
    site = work / "site"
    site.mkdir()
    actions: list[dict[str, Any]] = []
    state: dict[str, Any] = {"daemon": None, "cold": None}
    action_lock = threading.Lock()
    background: list[threading.Thread] = []

    def in_background(action: dict[str, Any], work: Any) -> None:
        # Starting a daemon takes seconds: not on the thread that takes the page's log lines.
        def run() -> None:
            try:
                work()
                action["done"] = True
            except Exception as exc:  # shows up in the test that needs the action
                action["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=run, daemon=True)
        background.append(thread)
        thread.start()

    def on_line(kind: str, text: str) -> None:
        if kind != "out" or not text.startswith("LORALOOM_ACTION "):
            return
        action = json.loads(text[len("LORALOOM_ACTION "):], strict=False)
        with action_lock:
            actions.append(action)
            daemon: SuiteDaemon | None = state["daemon"]
            if action.get("action") == "copy_adapter" and daemon is not None:
                # Written the way editors save: a hidden temporary folder renamed into place.
                target = daemon.extra_adapter_dir / action["target"]
                temp = daemon.extra_adapter_dir / f".{action['target']}.tmp"
                shutil.copytree(daemon.adapter_dir / action["source"], temp)
                temp.rename(target)
                action["done"] = True
            if action.get("action") == "healthz" and daemon is not None:
                # Read now, while the page holds its budget as it is (it waits a few seconds).
                action["health"] = health(daemon.url)
                action["done"] = True
            cold: ColdDaemon | None = state["cold"]
            if action.get("action") == "start_cold_daemon" and cold is not None:
                in_background(action, cold.start)
            elif action.get("action") == "freeze_cold_daemon" and cold is not None:
                in_background(action, cold.freeze)
            elif action.get("action") == "restart_cold_daemon" and cold is not None:
                signal_name = str(action.get("signal", "TERM"))
                in_background(action, lambda: cold.restart(signal_name))

    harness = godot_web.WebHarness(site, on_line=on_line).start()
    daemon: SuiteDaemon | None = None
    cold: ColdDaemon | None = None
    daemon_error: str | None = None
    try:
        live = request.getfixturevalue("live_daemon")
        daemon = start_suite_daemon(live, harness.origin, work)
        daemon.welcome = python_welcome(daemon)
        cold = ColdDaemon(live, harness.origin, work)
    except Exception as exc:  # the codec and loading checks still run without a daemon
        daemon_error = f"{type(exc).__name__}: {exc}"
    state["daemon"] = daemon
    state["cold"] = cold

    files = godot_web.read_project(ADDON_PROJECT)
    files["project.godot"] = suite_project_settings()
    cases = codec_cases()
    for name, (data, value) in cases.items():
        files[f"tests/fixtures/{name}.msgpack"] = data
        files[f"tests/fixtures/{name}.typed.json"] = json.dumps(typed(value)).encode()
    pack = godot_web.pack_project(files, site / "test.pck")

    with pytest.MonkeyPatch.context() as mp:
        discovery = discovery_cases(mp)
    config: dict[str, Any] = {
        "scripts": [f"res://{p}" for p in runtime_scripts()],
        "codec_cases": list(cases),
        "malformed_cases": golden_frame_names(),
        "discovery_cases": discovery,
        "protocol": protocol_config(),
        "daemon": None,
        "shipping": shipping_config(),
    }
    if daemon is not None:
        config["daemon"] = {
            "url": daemon.url,
            "runtime_json": daemon.runtime_file.read_text(),
            "adapters": sorted(p.name for p in daemon.adapter_dir.iterdir()
                               if p.is_dir() and not p.name.startswith(".")),
            "unknown_adapter": UNKNOWN_ADAPTER,
            "new_adapter": f"godot_{os.urandom(3).hex()}",
            "python_conversation": python_conversation(),
        }
        config["structured"] = structured_config()
    if cold is not None:
        config["cold"] = {"url": cold.url, "token": cold.token, "adapter": "alpha"}
    godot_web.stage_site(site, engine_dir, pack, config)

    started = time.monotonic()
    browser = godot_web.launch_chromium(f"{harness.origin}/index.html", work / "profile",
                                        work / "chromium.log")
    try:
        def finished(lines: list[tuple[str, str]]) -> bool:
            return any(k == "out" and t.startswith("LORALOOM_DONE ") for k, t in lines) or any(
                k == "page" and t.startswith("start failed") for k, t in lines)

        harness.wait_for(finished, SUITE_TIMEOUT)
        seconds = time.monotonic() - started
    finally:
        godot_web.stop_process(browser)
        harness.close()
    lines = harness.lines()
    results, done = parse_lines(lines)
    (work / "page.log").write_text("\n".join(f"[{k}] {t}" for k, t in lines))
    run = GodotRun(lines, results, done, seconds, daemon, daemon_error, actions, cold=cold)
    print(f"\nGDScript suite: {len(results)} results, "
          f"{sum(1 for r in results.values() if not r['ok'])} failed, in {seconds:.1f} s "
          f"(log: {work / 'page.log'})")
    request.config._loraloom_godot_summary = (  # type: ignore[attr-defined]
        len(results), sum(1 for r in results.values() if not r["ok"]), seconds)
    try:
        yield run
    finally:
        for thread in background:  # a daemon still being started would be left running
            thread.join(120)
        if cold is not None:
            cold.stop()
        if daemon is not None:
            daemon.process.terminate()
            try:
                daemon.process.wait(20)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    summary = getattr(config, "_loraloom_godot_summary", None)
    if summary:
        count, failed, seconds = summary
        terminalreporter.write_line(
            f"GDScript suite in Godot 4.6 (web, headless chromium): {count - failed} passed, "
            f"{failed} failed of {count} results, page ran {seconds:.1f} s")
