"""The Godot addon: static checks with gdtoolkit, then its behaviour in the real Godot 4.6 runtime.

The runtime results come from one page run (`godot_run` in conftest.py) against a real daemon on
a tiny random model, so the checks are on structure, never on what the text says.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from godot_suite import (
    ADDON_PROJECT,
    CHECK_CASES,
    PYTHON_HISTORY,
    UNKNOWN_ADAPTER,
    GodotRun,
    golden_frame_names,
    models_accept,
    runtime_scripts,
)

from bridge.client import Conversation
from bridge.messages import PROTOCOL_VERSION

GD_FILES = sorted(p for p in ADDON_PROJECT.rglob("*.gd") if ".godot" not in p.parts)
GENERATED = ADDON_PROJECT / "addons" / "loraloom" / "protocol.gd"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run `bash .ci/install-godot-deps.sh` (installs gdtoolkit)")
    return path


def _daemon_result(run: GodotRun, name: str) -> dict[str, Any]:
    if run.daemon is None:
        pytest.fail(f"the suite's daemon did not start: {run.daemon_error}")
    return run.result(name)


def _ok(result: dict[str, Any]) -> None:
    assert result["ok"], f"{result['name']}: {result['detail']} {result['data']}"


# ---------------------------------------------------------------- static checks


def test_every_gd_file_parses() -> None:
    """gdparse accepts every GDScript file of the addon project."""
    assert GD_FILES, "no .gd files found"
    proc = subprocess.run([_tool("gdparse"), *map(str, GD_FILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_gd_file_passes_gdlint(tmp_path: Path) -> None:
    """gdlint (the Godot style guide's rules, default settings) finds no problem; the generated
    protocol.gd, a table that grows with the protocol, is held to every rule but the file length."""
    written = [p for p in GD_FILES if p != GENERATED]
    proc = subprocess.run([_tool("gdlint"), *map(str, written)], capture_output=True, text=True,
                          cwd=ADDON_PROJECT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import yaml
    from gdtoolkit.linter import DEFAULT_CONFIG

    relaxed = {k: sorted(v) if isinstance(v, set) else v for k, v in DEFAULT_CONFIG.items()}
    (tmp_path / "gdlintrc").write_text(yaml.safe_dump({**relaxed, "max-file-lines": 100_000}))
    proc = subprocess.run([_tool("gdlint"), str(GENERATED)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_addon_ships_what_the_readme_promises() -> None:
    """The shipped folder has the plugin, the autoload and the node scripts, each documented."""
    addon = ADDON_PROJECT / "addons" / "loraloom"
    for name in ("plugin.cfg", "plugin.gd", "loraloom_client.gd", "msgpack.gd", "chat.gd", "image.gd"):
        assert (addon / name).is_file(), name
    assert 'script="plugin.gd"' in (addon / "plugin.cfg").read_text()
    for path in GD_FILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            exported = line.startswith("@export") and " var " in line
            if exported or line.startswith("signal "):
                assert lines[i - 1].startswith("##"), f"{path.name}:{i + 1} undocumented: {line}"


@pytest.mark.parametrize("name", sorted(CHECK_CASES))
def test_check_cases_say_what_the_models_say(name: str) -> None:
    """Each frame the GDScript checker is tried on is accepted or refused by the models as the case says."""
    frame, valid = CHECK_CASES[name]
    assert models_accept(frame) == valid


# ---------------------------------------------------------------- the runtime


def test_godot_web_runtime_ran_the_suite(godot_run: GodotRun) -> None:
    """Godot 4.6's web build started in chromium and the runner got to its end."""
    assert godot_run.setup_error is None
    engine = [t for k, t in godot_run.lines if k == "out" and t.startswith("Godot Engine v4.6")]
    assert engine, godot_run.log_tail()
    assert godot_run.done is not None, f"the runner did not finish:\n{godot_run.log_tail()}"
    assert godot_run.done["count"] == len(godot_run.results)


def test_no_script_errors(godot_run: GodotRun) -> None:
    """Nothing the suite loaded or ran printed a script error."""
    errors = [e for e in godot_run.errors() if "SCRIPT ERROR" in e or "Parse Error" in e]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("script", runtime_scripts())
def test_runtime_script_loads(godot_run: GodotRun, script: str) -> None:
    """Each script that runs in a game compiles in the real runtime (types, names, arguments)."""
    _ok(godot_run.result(f"load:res://{script}"))
    mentions = [e for e in godot_run.errors() if f"res://{script}" in e]
    assert not mentions, "\n".join(mentions)


@pytest.mark.parametrize("frame", [*golden_frame_names(), "boundaries"])
def test_codec_round_trips_frame(godot_run: GodotRun, frame: str) -> None:
    """Decoding gives the frame's JSON value with its types; encoding gives the bytes exactly."""
    _ok(godot_run.result(f"codec:{frame}"))


def test_codec_refuses_malformed_frames(godot_run: GodotRun) -> None:
    """Truncated frames, trailing bytes, too-deep nesting and unencodable values are refused."""
    result = godot_run.result("codec:malformed")
    _ok(result)
    assert result["data"]["refused"] > 0


def test_discovery_rule_matches_python(godot_run: GodotRun) -> None:
    """The runtime-file location rule gives the Python client's path on every platform."""
    result = godot_run.result("discovery:rule")
    _ok(result)
    assert result["data"]["cases"] >= 8


def test_discovery_reads_runtime_file(godot_run: GodotRun) -> None:
    """A runtime file is read with typed fields; malformed, non-JSON and missing ones are refused."""
    _ok(godot_run.result("discovery:read"))


def test_generated_protocol_constants(godot_run: GodotRun) -> None:
    """LoraloomProtocol holds the models' version, type names, error codes and meanings."""
    result = godot_run.result("protocol:constants")
    _ok(result)
    assert result["data"]["errors"] > 0


def test_frames_built_from_the_schema_are_canonical(godot_run: GodotRun) -> None:
    """LoraloomFrames.build, given only what differs from the defaults, gives every golden frame's bytes."""
    result = godot_run.result("protocol:build")
    _ok(result)
    assert result["data"]["cases"] == len(golden_frame_names())


def test_frame_checks_agree_with_the_models(godot_run: GodotRun) -> None:
    """LoraloomFrames.check accepts and refuses the same frames as the daemon's models."""
    result = godot_run.result("protocol:check")
    _ok(result)
    assert result["data"]["cases"] == len(CHECK_CASES)


def test_nodes_use_the_protocol_defaults(godot_run: GodotRun) -> None:
    """Chat and image nodes start from the protocol's defaults and build valid frames; the client
    fails a frame the daemon would refuse with bad_message before sending it."""
    result = godot_run.result("protocol:nodes")
    _ok(result)
    assert "temperature" in result["data"]["refused"]


def test_conversation_rules(godot_run: GodotRun) -> None:
    """LoraloomConversation keeps leading system messages, forgets what the daemon dropped, caps by
    whole turns, and records neither an empty stopped reply nor one for a replaced history."""
    _ok(godot_run.result("conversation:rules"))


# ---------------------------------------------------------------- against the daemon


def test_connects_through_runtime_file(godot_run: GodotRun) -> None:
    """The autoload finds the daemon through a runtime file and sees the welcome Python sees."""
    result = _daemon_result(godot_run, "client:connect")
    _ok(result)
    data, welcome = result["data"], godot_run.daemon.welcome  # type: ignore[union-attr]
    assert data["protocol"] == PROTOCOL_VERSION
    assert data["server"] == welcome["server"]
    assert data["text_model"] == welcome["text_model"]["name"]
    assert data["image_model"] == (welcome["image_model"] or {}).get("name")
    assert sorted(data["welcome_adapters"]) == sorted(a["name"] for a in welcome["adapters"])


def test_request_sent_while_connecting_waits_for_handshake(godot_run: GodotRun) -> None:
    """A ping sent before the welcome is queued, then answered by a pong."""
    result = _daemon_result(godot_run, "client:queued_request")
    _ok(result)
    assert result["data"]["server_time_is_float"]


def test_adapter_list(godot_run: GodotRun) -> None:
    """The autoload's adapter list holds the daemon's adapters, and list_adapters answers."""
    result = _daemon_result(godot_run, "client:adapters")
    _ok(result)
    expected = {"alpha", "beta", "gamma"}
    assert expected <= set(result["data"]["names"])
    assert expected <= set(result["data"]["listed"])


def test_two_adapters_stream_at_once(godot_run: GodotRun) -> None:
    """Two chat nodes on two adapters stream at the same time; tokens add up to each answer."""
    result = _daemon_result(godot_run, "chat:two_adapters")
    _ok(result)
    data = result["data"]
    assert data["in_flight_together"]
    assert len(set(data["ids"])) == 2
    for adapter in ("alpha", "beta"):
        chat = data[adapter]
        assert chat["ok"], chat
        assert chat["chunks"] >= 1
        assert chat["joined_tokens"] == chat["text"] == chat["finished_text"]
        # Every chunk's signal before the end's; no request id in them (one line at a time).
        assert chat["order"] == ["updated"] * chat["chunks"] + ["finished"]
        assert chat["finish_reason"] in ("stop", "length")
        assert chat["sent_adapters"] == [{"name": adapter, "scale": 1.0}]
        assert adapter in chat["adapter_versions"]
        assert 1 <= chat["completion_tokens"] <= 24


def test_stop_mid_stream(godot_run: GodotRun) -> None:
    """stop() after the first token ends the answer early, as cancelled, with its partial text."""
    result = _daemon_result(godot_run, "chat:stop")
    _ok(result)
    attempts = result["data"]["attempts"]
    # Attempts before the last ended by themselves (the random model said end-of-turn first).
    assert all(a["finish_reason"] in ("stop", "length") for a in attempts[:-1]), attempts
    stopped = attempts[-1]
    assert stopped["finish_reason"] == "cancelled", attempts
    assert stopped["chunks"] >= 1
    assert stopped["completion_tokens"] < stopped["max_tokens"]
    assert stopped["finished_text"].startswith(stopped["joined_tokens"])
    # A stopped line ends normally, recorded with what was said (unless nothing was).
    if stopped["finished_text"]:
        assert [m["content"] for m in stopped["history"]][1] == stopped["finished_text"]


def test_unknown_adapter_fails_the_request(godot_run: GodotRun) -> None:
    """An unknown adapter gives request_failed(unknown_adapter), not response_finished."""
    result = _daemon_result(godot_run, "chat:unknown_adapter")
    _ok(result)
    data = result["data"]
    assert data["code"] == "unknown_adapter"
    assert UNKNOWN_ADAPTER in data["message"]
    assert not data["finished"]
    assert data["history"] == [], "a failed line is not recorded"
    assert data["still_connected"]


def test_connection_usable_after_error(godot_run: GodotRun) -> None:
    """The same node and connection answer normally right after a refused request."""
    _ok(_daemon_result(godot_run, "chat:after_error"))


def test_history_and_await(godot_run: GodotRun) -> None:
    """`await chat.ask(...)` yields the reply's text; the history goes out with the next line,
    with trim_history on and the node's priority."""
    result = _daemon_result(godot_run, "chat:history_and_await")
    _ok(result)
    data = result["data"]
    history = data["history_after_first"]
    assert [turn["role"] for turn in history] == ["user", "assistant"]
    assert history[0]["content"] == "Hello there."
    assert history[1]["content"] == data["first_text"] == data["finished"][0]
    assert len(data["finished"]) == 2
    assert data["next_roles"] == ["system", "user", "assistant", "user"]
    assert data["next_trim_history"] is True and data["next_priority"] == "normal"
    assert data["history_size_after_second"] == 4


def test_a_200_turn_conversation_keeps_answering(godot_run: GodotRun) -> None:
    """200 lines on a 256-token context are all answered: the daemon drops the oldest whole turns,
    the node forgets the same ones, the persona always goes first, and trims come in steps."""
    result = _daemon_result(godot_run, "chat:200_turns")
    _ok(result)
    data = result["data"]
    assert data["answered"] == 200 and data["context"] == 256
    drops = data["drops"]
    assert sum(drops) > 150 and all(d % 2 == 0 for d in drops)
    trims = [d for d in drops if d]
    assert sum(trims) / len(trims) >= 4, drops
    assert data["first_message"] == {"role": "system", "content": "You are Salty Meg, the quartermaster."}
    assert data["history_size"] < 40


def test_conversation_saves_as_plain_json_and_restores(godot_run: GodotRun) -> None:
    """save_conversation writes the JSON the Python client reads; load_conversation restores it
    (same frames, same reply on the same seed), reads the Python client's saves, refuses bad ones
    without changing anything; history can be assigned from game code."""
    result = _daemon_result(godot_run, "chat:save_and_restore")
    _ok(result)
    data = result["data"]
    saved = json.loads(data["saved"])
    assert saved["system_prompt"] == "You are Salty Meg, the quartermaster."
    assert [m["content"] for m in saved["history"][::2]] == data["lines"]
    python = Conversation(None, history=[])  # type: ignore[arg-type]
    python.load_json(data["saved"])
    assert python.history == saved["history"] == data["restored_history"]
    assert data["restored_persona"] == saved["system_prompt"]
    assert data["same_frames"] and data["again"] == data["original"]
    assert data["refused"] == [True] * 5 and data["unchanged"]
    assert data["python_history"] == PYTHON_HISTORY and data["python_persona"] == "Meg"
    assert data["assigned_roles"] == ["system", "system", "user", "assistant", "user"]  # persona, then the note


def test_concurrent_asks_are_answered_in_order(godot_run: GodotRun) -> None:
    """Three lines asked at once go out one at a time in order, each with the ones before it."""
    result = _daemon_result(godot_run, "chat:concurrent_asks")
    _ok(result)
    data = result["data"]
    assert data["busy"]
    history = data["history"]
    assert [m["content"] for m in history[::2]] == ["one", "two", "three"]
    assert [m["content"] for m in history[1::2]] == data["texts"] == data["finished"]
    tokens = data["prompt_tokens"]
    assert tokens[0] < tokens[1] < tokens[2]
    expected: list[str] = []
    for chunks in data["chunks"]:
        expected += ["updated"] * chunks + ["finished"]
    assert data["order"] == expected


def test_image_generation(godot_run: GodotRun) -> None:
    """LoraloomImage reports every step and hands over a texture of the asked size."""
    result = _daemon_result(godot_run, "image:generate")
    if result["data"].get("not_run"):
        assert godot_run.daemon.welcome["image_model"] is None  # type: ignore[union-attr]
        pytest.skip("not run: the test daemon has no image model (welcome.image_model is null)")
    _ok(result)
    data = result["data"]
    assert data["progress"] == [[1, 2], [2, 2]]
    assert data["sizes"] == [[64, 64]]


def test_adapter_changed_after_folder_change(godot_run: GodotRun) -> None:
    """Copying an adapter folder in makes the daemon emit an event and Godot adapter_changed."""
    result = _daemon_result(godot_run, "adapters:changed")
    actions = [a for a in godot_run.actions if a.get("action") == "copy_adapter"]
    assert actions and actions[0].get("done"), godot_run.actions
    _ok(result)
    events = result["data"]["events"]
    assert events[0][1] in ("added", "updated")
    assert actions[0]["target"] in result["data"]["listed"]
    assert any(e[2] == "ready" for e in events)


def test_new_adapter_serves(godot_run: GodotRun) -> None:
    """The adapter that appeared during play answers a chat right away."""
    result = _daemon_result(godot_run, "adapters:new_adapter_serves")
    _ok(result)
    assert len(result["data"]["adapter_versions"]) == 1


def test_demo_three_npcs_speak_at_once(godot_run: GodotRun) -> None:
    """The demo scene's three NPCs answer one line at once, each on its own adapter."""
    result = _daemon_result(godot_run, "demo:three_npcs")
    _ok(result)
    outcome = result["data"]["outcome"]
    assert result["data"]["npcs"] == 3
    assert sorted(o[2][0] for o in outcome) == ["alpha", "beta", "gamma"]


def test_bad_token_is_refused(godot_run: GodotRun) -> None:
    """A wrong token ends in connection_failed with the daemon's unauthorized code."""
    result = _daemon_result(godot_run, "client:bad_token")
    _ok(result)
    assert "unauthorized" in result["data"]["reason"]


def test_reconnect(godot_run: GodotRun) -> None:
    """After disconnecting, connecting again works, raises reconnected, and requests are answered."""
    result = _daemon_result(godot_run, "client:reconnect")
    _ok(result)
    assert result["data"]["disconnected_signals"] == 1
    assert result["data"]["reconnected_signals"] == 1


# ---------------------------------------------------------------- the life cycle


def _action(run: GodotRun, name: str, index: int = 0) -> dict[str, Any]:
    found = [a for a in run.actions if a.get("action") == name]
    assert len(found) > index, run.actions
    assert found[index].get("done"), found[index]
    return found[index]


def test_a_line_asked_before_the_daemon_is_up_is_answered(godot_run: GodotRun) -> None:
    """Cold start: a line asked while nothing listens waits through failed attempts and is answered
    once the daemon starts; a request cancelled while waiting ends as the daemon would end it."""
    result = _daemon_result(godot_run, "life:cold_start")
    _action(godot_run, "start_cold_daemon")
    _ok(result)
    data = result["data"]
    assert data["attempts_before_start"] and data["waited"]
    assert data["finish_reason"] in ("stop", "length")
    assert [m["content"] for m in data["history"][::2]] == ["Are you awake?"]
    assert data["connected"] == 1 and data["reconnected"] == 0
    assert data["dropped"] == {"done": True, "ok": True, "finish_reason": "cancelled", "error": "", "text": ""}


@pytest.mark.parametrize("signal_name", ["TERM", "KILL"])
def test_a_restart_keeps_the_waiting_lines(godot_run: GodotRun, signal_name: str) -> None:
    """The daemon stopped with SIGTERM (it says shutting_down, closes with 1001, removes its
    runtime file) or killed (1006, the file stays) under a conversation: the line that was
    streaming fails with that code, the line waiting behind it and a request the daemon never saw
    go out after the reconnection and are answered; disconnected and reconnected fire."""
    result = _daemon_result(godot_run, f"life:restart_{signal_name.lower()}")
    _action(godot_run, "freeze_cold_daemon", 0 if signal_name == "TERM" else 1)
    _action(godot_run, "restart_cold_daemon", 0 if signal_name == "TERM" else 1)
    _ok(result)
    data = result["data"]
    assert data["frozen"] and data["streaming_when_frozen"], "the line was streaming, unfinished, when the signal came"
    in_flight = data["in_flight"]
    assert not in_flight["ok"] and in_flight["chunks"] > 0, in_flight
    assert in_flight["error"] == ("shutting_down" if signal_name == "TERM" else "connection_closed"), in_flight
    assert data["waited"] and data["waiting_ok"]
    assert data["history_users"][-1] == "after the restart"
    if signal_name == "KILL":
        assert data["unanswered"] == {"waited": True, "ok": True, "error": ""}, "sent again and answered"
    assert data["disconnected"] == [1001 if signal_name == "TERM" else 1006]
    assert data["reconnected"] == 1
    cold = godot_run.cold
    assert cold is not None
    stop = next(s for s in cold.stops if s["signal"] == signal_name)
    assert stop["code"] == (0 if signal_name == "TERM" else -9)
    assert stop["runtime_file_left"] == (signal_name == "KILL")
    if signal_name == "TERM":
        # Under websockets' 10 s close timeout, the wait a shutdown that waited on its clients would
        # show (a loaded 2-core CI machine took 5.3 s once for the exit itself).
        assert stop["seconds"] < 9, "SIGTERM with a client attached: no wait on it"


# ---------------------------------------------------------------- stopping a started daemon
# The web runtime cannot start processes, so the script the addon's stop_daemon() runs (a
# detached /bin/sh, STOP_SCRIPT in loraloom_client.gd) is run here as the addon runs it.

STANDIN = """import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: open(sys.argv[2], "w").close())
json.dump({"url": "ws://127.0.0.1:1", "token": "t", "pid": int(sys.argv[3] or os.getpid())}, open(sys.argv[1], "w"),
          indent=2)
while True:
    time.sleep(0.05)
"""


def _stop_script() -> str:
    text = (ADDON_PROJECT / "addons" / "loraloom" / "loraloom_client.gd").read_text()
    match = re.search(r'^const STOP_SCRIPT := """(.*?)"""', text, re.S | re.M)
    assert match, "STOP_SCRIPT not found in loraloom_client.gd"
    assert "\\" not in match.group(1), "the script must not need GDScript escapes"
    return match.group(1)


def _run_stop_script(pid: int, steps: int, runtime_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", _stop_script(), "loraloom-stop", str(pid), str(steps), str(runtime_file)],
                          capture_output=True, text=True, timeout=60)


def test_stop_script_sigterms_the_daemon_which_closes_its_clients_and_exits(live_daemon: Any, tmp_path: Path) -> None:
    """SIGTERM first: a daemon with a client attached exits by itself (no kill: the script ends
    long before the grace period) and removes its own runtime file."""
    from support import start_daemon
    from websockets.sync.client import connect

    from bridge import codec
    from bridge import messages as m

    runtime = tmp_path / "daemon.json"
    proc = start_daemon(live_daemon.serve_command(runtime), runtime, tmp_path / "daemon.log")
    info = json.loads(runtime.read_text())
    with connect(info["url"]) as ws:
        ws.send(codec.encode(m.Hello(protocol=m.PROTOCOL_VERSION, token=info["token"], client="stop-test")))
        assert codec.decode_server(ws.recv(10)).type == "welcome"
        done = _run_stop_script(proc.pid, 300, runtime)
        assert done.returncode == 0, done.stderr
        assert proc.wait(10) == 0, "it exited by itself, not killed"
    assert not runtime.exists()


def test_stop_script_kills_what_ignores_sigterm_and_removes_its_runtime_file(tmp_path: Path) -> None:
    """After the grace period the script kills the process and removes the runtime file it left,
    but only a file that names that process."""
    for names_it in (True, False):
        runtime, termed = tmp_path / f"daemon-{names_it}.json", tmp_path / f"termed-{names_it}"
        proc = subprocess.Popen([sys.executable, "-c", STANDIN, str(runtime), str(termed), "" if names_it else "1"])
        try:
            deadline = time.monotonic() + 20
            while not runtime.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            done = _run_stop_script(proc.pid, 10, runtime)
            assert done.returncode == 0, done.stderr
            assert proc.wait(10) == -signal.SIGKILL
            assert termed.exists(), "SIGTERM came first"
            assert runtime.exists() != names_it
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
