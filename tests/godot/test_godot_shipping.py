"""Shipping a Godot game with loraloom: placement, launch and the export's files.

What runs in the real Godot 4.6 runtime (suite_shipping.gd, in the one page run): the placement of
the runtime and the pack next to an exported executable, the launch plan of the autoload (exported
and in the editor), the export's file list and its copy on real folders, and that the web build
starts nothing (a browser cannot start processes). What cannot run here: the EditorExportPlugin
itself (no editor binary on this machine; the web runtime has no Editor* classes) and
OS.create_process of a desktop build; those are checked statically below, the launch plan's
command line is run against the real daemon by pytest, and so is the watcher script that stops the
daemon of a game that crashed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from godot_cases import EXECUTABLES, EXPORT_PATHS, PACK_FILES, RUNTIME_FILES, expected_export_targets
from godot_suite import ADDON_PROJECT, GodotRun

ADDON = ADDON_PROJECT / "addons" / "loraloom"



def test_runtime_and_pack_sit_next_to_the_executable(godot_run: GodotRun) -> None:
    """<folder of the executable>/loraloom/runtime/loraloom[.exe] and .../loraloom/pack, as the
    shipping contract says; a macOS .app export puts them in Contents/MacOS, beside its executable."""
    data = godot_run.passed("shipping:paths", needs_daemon=False)
    assert [c["executable"] for c in data["cases"]] == list(EXECUTABLES)
    for case in data["cases"]:
        root = EXECUTABLES[case["executable"]]
        assert case["root"] == root
        assert case["runtime_linux"] == case["runtime_macos"] == f"{root}/runtime/loraloom"
        assert case["runtime_windows"] == f"{root}/runtime/loraloom.exe"
        assert case["pack"] == f"{root}/pack"
    assert data["export_dirs"] == EXPORT_PATHS
    refusals = data["refusals"]
    for features, why in refusals.items():
        assert bool(why) == (features.split(",")[0] in ("web", "android", "ios")), (features, why)


def test_launch_plan_exported_and_in_the_editor(godot_run: GodotRun) -> None:
    """An exported game runs runtime/loraloom with --pack added to its arguments, and says clearly
    what is missing (runtime, pack); in the editor the developer's loraloom is looked up on PATH
    (.exe and ';' on Windows) or taken as configured, and its absence is said as clearly."""
    data = godot_run.passed("shipping:launch_plan", needs_daemon=False)
    plans, root, bin_dir = data["plans"], data["root"], data["bin"]
    exported = plans["exported"]
    assert exported == {"executable": f"{root}/runtime/loraloom", "source": "shipped", "error": "",
                        "arguments": ["serve", "--port", "0", "--pack", f"{root}/pack"]}
    assert plans["exported_pack_given"]["arguments"] == ["serve", "--pack", "/elsewhere"]
    assert "no loraloom runtime at" in plans["exported_missing_runtime"]["error"]
    assert f"{root}/runtime/loraloom" in plans["exported_missing_runtime"]["error"]
    assert "no game pack at" in plans["exported_missing_pack"]["error"]
    assert "not on PATH" in plans["editor_not_on_path"]["error"]
    assert plans["editor_not_on_path"]["source"] == "developer"
    for name in ("editor_on_path", "editor_configured_path"):
        assert plans[name]["executable"] == f"{bin_dir}/loraloom" and plans[name]["error"] == "", name
        assert plans[name]["arguments"] == ["serve", "--port", "0"], "the editor passes no --pack"
    assert plans["editor_windows_exe"]["executable"] == f"{bin_dir}/loraloom.exe"
    assert data["carries_runtime"] == {"exported": True, "editor": False, "elsewhere": False}


def test_export_adds_every_file_of_the_bundle_and_the_pack(godot_run: GodotRun) -> None:
    """The export's file list holds every file of the runtime folder and the pack (hidden ones
    too) under loraloom/runtime and loraloom/pack; the copy writes them with their contents and
    first removes what an earlier export left; unset or incomplete folders are named clearly."""
    data = godot_run.passed("shipping:export_files", needs_daemon=False)
    targets = [t for _, t in data["files"]]
    assert targets == expected_export_targets()
    for source, target in data["files"]:
        kind = "runtime" if target.startswith("loraloom/runtime/") else "pack"
        assert source == f"built/{kind}/{target.split('/', 2)[2]}"
    expected = {f"loraloom/runtime/{p}": f"runtime:{p}" for p in RUNTIME_FILES}
    expected |= {f"loraloom/pack/{p}": f"pack:{p}" for p in PACK_FILES}
    assert data["copied"] == expected
    assert data["stale_left"] is False
    problems = data["problems"]
    assert problems["ready"] == []
    assert len(problems["unset"]) == 2 and all("is not set" in p for p in problems["unset"])
    assert problems["windows_bundle_missing"] == [
        next(p for p in problems["windows_bundle_missing"] if "loraloom.exe" in p)]
    assert any("manifest.json" in p for p in problems["no_manifest"])
    assert data["export_none"] == 0


def test_the_web_build_starts_no_process(godot_run: GodotRun) -> None:
    """In a web export start_daemon() does nothing and returns -1 (browsers cannot start processes)."""
    data = godot_run.passed("shipping:web_starts_nothing", needs_daemon=False)
    assert data == {"pid": -1, "web": True, "editor": False, "daemon_pid": -1}


# ---------------------------------------------------------------- static: the editor side


def test_export_plugin_is_registered_and_uses_the_tested_functions() -> None:
    """plugin.gd adds and removes the export plugin; export_plugin.gd is an EditorExportPlugin whose
    hooks call LoraloomShipping's tested functions and skip platforms that cannot start processes."""
    plugin = (ADDON / "plugin.gd").read_text()
    assert "add_export_plugin(_export)" in plugin and "remove_export_plugin(_export)" in plugin
    assert 'preload("res://addons/loraloom/export_plugin.gd")' in plugin
    assert "LoraloomShipping.SETTINGS" in plugin and "LoraloomBudget.SETTINGS" in plugin
    source = (ADDON / "export_plugin.gd").read_text()
    assert re.search(r"^@tool\s*\nextends EditorExportPlugin$", source, re.M)
    hooks = set(re.findall(r"^func (_\w+)\(", source, re.M))
    assert {"_get_name", "_export_begin", "_export_end"} <= hooks
    for call in ("export_refusal(", "check_folders(", "export_dir(", "export_files(", "copy_files("):
        assert f"LoraloomShipping.{call}" in source, call
    assert not re.search(r"\badd_file\(", source), "the runtime must stay outside the .pck"


def test_autoload_launches_through_the_plan_and_stops_what_it_started() -> None:
    """start_daemon() runs LoraloomShipping.launch_plan's executable (exported: OS.has_feature('editor')
    false), the autoload stops the daemon it started when it leaves the tree (the game quits)."""
    client = (ADDON / "loraloom_client.gd").read_text()
    start = client[client.index("func start_daemon()"):client.index("func stop_daemon()")]
    assert 'LoraloomShipping.launch_plan(OS.has_feature("editor")' in start
    assert "OS.create_process(str(plan[\"executable\"]), arguments)" in start
    assert 'OS.has_feature("web")' in start
    exit_tree = client[client.index("func _exit_tree()"):client.index("func _process(")]
    assert "stop_daemon()" in exit_tree and "stop_daemon_on_exit" in exit_tree


# ---------------------------------------------------------------- the plan's command line, for real


@pytest.fixture()
def shipped_layout(live_daemon: Any, tmp_path: Path) -> Path:
    """<game>/loraloom/runtime/loraloom (a stand-in that runs this checkout's daemon, as the bundle
    would) and <game>/loraloom/pack (written by `loraloom pack` from the test model and adapters)."""
    root = tmp_path / "game" / "loraloom"
    runtime = root / "runtime"
    runtime.mkdir(parents=True)
    launcher = runtime / "loraloom"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m daemon "$@"\n')
    launcher.chmod(0o755)
    pack = subprocess.run([sys.executable, "-m", "daemon", "pack", "--model", str(live_daemon.model_dir),
                           "--adapters", str(live_daemon.text_adapter_dir), "--out", str(root / "pack")],
                          capture_output=True, text=True, cwd=ADDON_PROJECT.parent, timeout=300)
    assert pack.returncode == 0, pack.stdout + pack.stderr
    assert (root / "pack" / "manifest.json").is_file()
    return root


def test_the_plans_command_line_is_served_by_the_daemon(godot_run: GodotRun, shipped_layout: Path,
                                                        tmp_path: Path) -> None:
    """The argv the autoload builds for an exported game (the plan the Godot runtime computed, with
    this machine's folder for its root, plus the --runtime-file it adds) starts a daemon on the
    pack that answers the Python client; SIGTERM, as stop_daemon() sends it, stops it cleanly."""
    from support import start_daemon, stop_daemon

    import bridge

    data = godot_run.passed("shipping:launch_plan", needs_daemon=False)
    plan, web_root = data["plans"]["exported"], data["root"]
    argv = [plan["executable"].replace(web_root, str(shipped_layout)),
            *(a.replace(web_root, str(shipped_layout)) for a in plan["arguments"])]
    runtime_file = tmp_path / "daemon.json"
    argv += ["--runtime-file", str(runtime_file), "--host", "127.0.0.1", "--max-context", "256"]
    proc = start_daemon(argv, runtime_file, tmp_path / "daemon.log", timeout=120)
    try:
        info = json.loads(runtime_file.read_text())

        async def ask() -> list[str]:
            async with bridge.connect(info["url"], info["token"]) as client:
                result = await client.complete("Hello", adapters=["alpha"], max_tokens=4, seed=1)
                assert result.finish_reason in ("stop", "length")
                return [a.name for a in await client.adapters()]

        import asyncio

        names = asyncio.run(ask())
        assert {"alpha", "beta", "gamma"} <= set(names)
    finally:
        code = stop_daemon(proc)
    assert code == 0, "it exited by itself on SIGTERM"
    assert not runtime_file.exists(), "and removed its runtime file"


# ---------------------------------------------------------------- a game that crashes
# start_daemon() leaves WATCH_SCRIPT running beside the daemon (a detached /bin/sh); the web runtime
# cannot start it, so it is run here as the addon runs it, with a stand-in for the game.


def _script(name: str) -> str:
    text = (ADDON / "loraloom_client.gd").read_text()
    match = re.search(rf'^const {name} := """(.*?)"""', text, re.S | re.M)
    assert match, f"{name} not found in loraloom_client.gd"
    assert "\\" not in match.group(1), "the script must not need GDScript escapes"
    return match.group(1)


def _watch(game_pid: int, daemon_pid: int, runtime_file: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(["/bin/sh", "-c", _script("WATCH_SCRIPT"), "loraloom-watch", str(game_pid),
                             _script("STOP_SCRIPT"), str(daemon_pid), "300", str(runtime_file)],
                            text=True, start_new_session=True)


def test_a_crashed_game_does_not_leave_its_daemon_running(live_daemon: Any, tmp_path: Path) -> None:
    """The game is killed (SIGKILL: no _exit_tree, no stop_daemon): the watcher sees it gone and
    stops the daemon with SIGTERM, which exits by itself and removes its runtime file."""
    from support import start_daemon

    runtime = tmp_path / "daemon.json"
    daemon = start_daemon(live_daemon.serve_command(runtime), runtime, tmp_path / "daemon.log")
    game = subprocess.Popen(["sleep", "600"])
    watcher = _watch(game.pid, daemon.pid, runtime)
    try:
        time.sleep(1.5)
        assert daemon.poll() is None and watcher.poll() is None, "both wait while the game runs"
        game.kill()
        game.wait()
        assert daemon.wait(60) == 0, "stopped with SIGTERM, not killed"
        assert watcher.wait(30) == 0
        assert not runtime.exists()
    finally:
        for proc in (game, daemon, watcher):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_watcher_leaves_when_the_daemon_goes_first(tmp_path: Path) -> None:
    """A daemon that exits while the game runs ends the watcher, which touches nothing else."""
    game = subprocess.Popen(["sleep", "600"])
    daemon = subprocess.Popen(["sleep", "600"])
    watcher = _watch(game.pid, daemon.pid, tmp_path / "none.json")
    try:
        time.sleep(1.5)
        assert watcher.poll() is None
        daemon.kill()
        daemon.wait()
        assert watcher.wait(30) == 0
        assert game.poll() is None, "the game is untouched"
    finally:
        for proc in (game, daemon, watcher):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
