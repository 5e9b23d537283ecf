"""The GDScript suite's pieces that are specific to loraloom: fixtures data and the suite's daemon.

`godot_run` (session-wide, in conftest.py) packs the addon project into a .pck with the golden
frames, starts a daemon of our own (on the tiny model of `live_daemon`, with the page's Origin
allowed and an extra adapter folder that the suite may change), serves the page on loopback,
opens it in headless chromium once and collects the results the runner prints. The tests in
test_godot_addon.py then assert on those results one by one. A second daemon, `ColdDaemon`, is not
running when the page starts: the life-cycle suite (suite_life.gd) asks pytest to start, freeze,
stop (SIGTERM or SIGKILL) and restart it, on a port fixed in advance.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import godot_web

_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_JSON_ESCAPES = set('"\\/bfnrtu')


def loads_godot_json(text: str) -> Any:
    """Parse a line of Godot's JSON.stringify, which writes some control characters as escapes
    JSON does not have (\\v for a vertical tab): turn those into \\uXXXX first. The random test
    model's text contains such characters now and then."""

    def fix(match: re.Match[str]) -> str:
        char = match.group(1)
        if char in _JSON_ESCAPES:
            return match.group(0)
        code = {"v": 0x0B, "a": 0x07, "0": 0x00}.get(char, ord(char))
        return f"\\u{code:04x}"

    return json.loads(_ESCAPE.sub(fix, text), strict=False)

REPO = godot_web.REPO_ROOT
ADDON_PROJECT = REPO / "godot_addon"
FRAMES_DIR = REPO / "tests" / "fixtures" / "frames"
# Editor-only scripts: EditorPlugin and friends do not exist in an exported game.
EDITOR_SCRIPTS = {
    "addons/loraloom/plugin.gd",
    "addons/loraloom/dock.gd",
    "addons/loraloom/debugger_plugin.gd",
    "addons/loraloom/export_plugin.gd",
}
SUITE_TIMEOUT = 420.0
UNKNOWN_ADAPTER = "ghost"
PYTHON_HISTORY = [{"role": "user", "content": "café 🎲 \"quoted\"\nnext line"}, {"role": "assistant", "content": "aye"}]


def python_conversation() -> str:
    """A save written by the Python client's Conversation.to_json: the addon must read it."""
    from bridge.client import Conversation

    return Conversation(None, system_prompt="Meg", history=PYTHON_HISTORY).to_json()  # type: ignore[arg-type]


def runtime_scripts() -> list[str]:
    """res:// paths of every script that runs in a game (the runner loads each one)."""
    paths = sorted(p.relative_to(ADDON_PROJECT).as_posix() for p in ADDON_PROJECT.rglob("*.gd")
                   if ".godot" not in p.parts)
    return [p for p in paths if p not in EDITOR_SCRIPTS]


def golden_frame_names() -> list[str]:
    return sorted(p.stem for p in FRAMES_DIR.glob("*.msgpack"))


# ---------------------------------------------------------------- codec fixtures


def typed(value: Any) -> Any:
    """A JSON form that keeps what Godot's JSON parser would lose (int vs float, bytes, key order)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return {"$int": _halves(value)}
    if isinstance(value, float):
        return {"$float": _halves(struct.unpack("<q", struct.pack("<d", value))[0])}
    if isinstance(value, bytes):
        return {"$bin": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    if isinstance(value, dict):
        return {"$map": [[typed(k), typed(v)] for k, v in value.items()]}
    raise TypeError(type(value))


def _halves(n: int) -> list[int]:
    # Godot's JSON numbers are doubles and its String.to_int() refuses -2**63: two 32-bit halves
    # (signed high, unsigned low) carry any int64 exactly.
    return [n >> 32, n & 0xFFFFFFFF]


def from_golden_json(value: Any) -> Any:
    """The golden JSON's value with {"$bin": base64} turned back into bytes."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return base64.b64decode(value["$bin"])
        return {k: from_golden_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_golden_json(v) for v in value]
    return value


def boundary_value() -> dict[str, Any]:
    """Values at every msgpack size boundary, so the encoder's choice of form is checked too."""
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
            -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]
    return {
        "ints": ints,
        "floats": [0.0, -0.0, 1.5, -2.25, 1e300, 5e-324, 0.1],
        "strs": ["", "a" * 31, "b" * 32, "c" * 255, "d" * 256, "e" * 65535, "f" * 65536, "héllo ✓ 🎲"],
        "bins": [b"", b"\x00" * 255, b"\x01" * 256, b"\x02" * 65535, b"\x03" * 65536],
        "arrays": [list(range(15)), list(range(16)), [None, True, False]],
        "maps": [{f"k{i}": i for i in range(15)}, {f"k{i}": i for i in range(16)}, {"z": 1, "a": 2}],
        "array32": [None] * 65536,
    }


def codec_cases() -> dict[str, tuple[bytes, Any]]:
    """name -> (canonical bytes, value): every golden frame, plus the boundary case."""
    cases: dict[str, tuple[bytes, Any]] = {}
    for name in golden_frame_names():
        data = (FRAMES_DIR / f"{name}.msgpack").read_bytes()
        value = from_golden_json(json.loads((FRAMES_DIR / f"{name}.json").read_text(encoding="utf-8")))
        cases[name] = (data, value)
    value = boundary_value()
    cases["boundaries"] = (msgpack.packb(value, use_bin_type=True), value)
    return cases


# ---------------------------------------------------------------- protocol fixtures

_ASK = {"type": "generate", "id": "c-1", "prompt": "hi"}
_CHAT = {"type": "generate", "id": "c-1", "messages": [{"role": "user", "content": "hi"}]}
_TIMINGS = {"queued_ms": 1.0, "total_ms": 2.0}
# name -> (frame, whether the models accept it): LoraloomFrames.check must agree with them.
CHECK_CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "generate": (_ASK, True),
    "generate_chat_and_null_prompt": ({**_CHAT, "prompt": None}, True),
    "int_for_float": ({**_ASK, "temperature": 1}, True),
    "id_of_64": ({**_ASK, "id": "x" * 64}, True),
    "seed_of_63_bits": ({**_ASK, "seed": 2**63 - 1}, True),
    "scale_at_bound": ({**_ASK, "adapters": [{"name": "pirate", "scale": -8.0}]}, True),
    "error_with_null_id": ({"type": "error", "id": None, "code": "internal", "message": "m"}, True),
    "unknown_type": ({"type": "teleport", "id": "t"}, False),
    "no_type": ({"id": "t"}, False),
    "unknown_field": ({**_ASK, "colour": 1}, False),
    "missing_id": ({"type": "generate", "prompt": "hi"}, False),
    "empty_id": ({**_ASK, "id": ""}, False),
    "id_of_65": ({**_ASK, "id": "x" * 65}, False),
    "temperature_above": ({**_ASK, "temperature": 5.5}, False),
    "top_p_at_exclusive_bound": ({**_ASK, "top_p": 0.0}, False),
    "temperature_nan": ({**_ASK, "temperature": math.nan}, False),
    "max_tokens_below": ({**_ASK, "max_tokens": 0}, False),
    "max_tokens_null": ({**_ASK, "max_tokens": None}, False),
    "seed_negative": ({**_ASK, "seed": -1}, False),
    "stream_not_bool": ({**_ASK, "stream": "maybe"}, False),
    "adapter_path": ({**_ASK, "adapters": [{"name": "../etc"}]}, False),
    "adapter_trailing_newline": ({**_ASK, "adapters": [{"name": "pirate\n"}]}, False),
    "adapter_scale_below": ({**_ASK, "adapters": [{"name": "pirate", "scale": -8.5}]}, False),
    "adapter_unknown_field": ({**_ASK, "adapters": [{"name": "pirate", "weight": 1}]}, False),
    "adapters_not_list": ({**_ASK, "adapters": {"name": "pirate"}}, False),
    "too_many_stops": ({**_ASK, "stop": ["a"] * 17}, False),
    "empty_stop": ({**_ASK, "stop": [""]}, False),
    "unknown_role": ({**_CHAT, "messages": [{"role": "narrator", "content": "x"}]}, False),
    "hello_long_token": ({"type": "hello", "protocol": 1, "token": "t" * 257}, False),
    "hello_negative_protocol": ({"type": "hello", "protocol": -1, "token": "t"}, False),
    "unknown_topic": ({"type": "subscribe", "id": "s", "topics": ["weather"]}, False),
    "image_too_narrow": ({"type": "generate_image", "id": "i", "prompt": "x", "width": 7}, False),
    "chunk_index_not_int": ({"type": "chunk", "id": "c", "text": "x", "index": "zero", "tokens": 1}, False),
    "welcome_without_limits": ({"type": "welcome", "protocol": 1, "server": "0"}, False),
    "result_version_not_int": ({"type": "result", "id": "r", "text": "", "finish_reason": "stop",
                                "prompt_tokens": 1, "completion_tokens": 1, "adapter_versions": {"a": "x"},
                                "timings": _TIMINGS}, False),
    "image_not_bytes": ({"type": "image_result", "id": "i", "images": [1], "seed": 1, "width": 8, "height": 8,
                         "timings": _TIMINGS}, False),
    "nested_part_missing_name": ({"type": "adapter_event", "event": "added",
                                  "adapter": {"kind": "text", "status": "ready"}}, False),
}


def models_accept(frame: dict[str, Any]) -> bool:
    """Whether bridge's codec (the daemon's own validation) accepts `frame`, in either direction."""
    from bridge import codec

    data = msgpack.packb(frame, use_bin_type=True)
    for decode in (codec.decode_client, codec.decode_server):
        try:
            decode(data)
            return True
        except codec.FrameError:
            continue
    return False


def protocol_config() -> dict[str, Any]:
    """What suite_protocol.gd checks LoraloomProtocol and LoraloomFrames against."""
    from bridge import gen, gen_schema

    spec = gen_schema.protocol()
    facts = {
        "version": spec.version,
        "client_types": [m.type_name for m in spec.client],
        "server_types": [m.type_name for m in spec.server],
        "errors": {e.code: e.meaning for e in spec.errors},
        "client_only": [e.code for e in spec.errors if e.client_only],
    }
    # Each golden frame's fields that differ from their defaults: build() must restore the rest.
    build_cases = [{"name": name, "type": type(message).model_fields["type"].default,
                    "fields": typed(message.model_dump(mode="python", exclude_defaults=True, exclude_none=True))}
                   for name, message in gen.EXAMPLES.items()]
    check_cases = [{"name": name, "frame": typed(frame), "valid": models_accept(frame)}
                   for name, (frame, _) in CHECK_CASES.items()]
    return {"facts": facts, "build_cases": build_cases, "check_cases": check_cases}


def discovery_cases(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The Python client's runtime-file locations for several platforms and environments."""
    from bridge import discovery

    home = "/home/npc"
    variants = [
        ("linux", "Linux", {"XDG_RUNTIME_DIR": "/run/user/1000"}),
        ("linux", "Linux", {}),
        ("linux", "Linux", {"XDG_RUNTIME_DIR": ""}),
        ("linux", "Linux", {"LORALOOM_RUNTIME_FILE": "/tmp/custom/daemon.json", "XDG_RUNTIME_DIR": "/x"}),
        ("freebsd13", "FreeBSD", {"XDG_RUNTIME_DIR": "/var/run/user/7"}),
        ("darwin", "macOS", {}),
        ("win32", "Windows", {"LOCALAPPDATA": "C:\\Users\\npc\\AppData\\Local"}),
        ("win32", "Windows", {}),
    ]
    cases = []
    for platform, os_name, env in variants:
        with monkeypatch.context() as m:
            for key in ("LORALOOM_RUNTIME_FILE", "LOCALAPPDATA", "XDG_RUNTIME_DIR"):
                m.delenv(key, raising=False)
            for key, val in env.items():
                m.setenv(key, val)
            m.setenv("HOME", home)
            m.setattr(discovery, "sys", type("FakeSys", (), {"platform": platform}))
            expected = str(discovery.default_runtime_file())
        cases.append({"os": os_name, "env": env, "home": home, "expected": expected})
    return cases


# ---------------------------------------------------------------- the daemon of this suite


@dataclass
class SuiteDaemon:
    process: subprocess.Popen[bytes]
    url: str
    token: str
    runtime_file: Path
    adapter_dir: Path
    extra_adapter_dir: Path
    log_path: Path
    welcome: dict[str, Any] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_suite_daemon(live: Any, origin: str, workdir: Path) -> SuiteDaemon:
    runtime = workdir / "daemon.json"
    extra_dir = workdir / "adapters-extra"
    extra_dir.mkdir()
    extra = ["--allow-origin", origin, "--text-adapters", str(extra_dir)]
    if importlib.util.find_spec("diffusers") is not None:
        # The placeholder image model (built once into the user's cache): it draws noise, which is
        # all the image path of the addon needs. Without diffusers the image test reports "not run".
        extra += ["--image-model", "default"]
    argv = live.serve_command(runtime, 0, extra)
    log_path = workdir / "daemon.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}:\n{log_path.read_text()}")
        if runtime.exists() and "listening on ws://" in log_path.read_text(errors="replace"):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"the daemon did not start in 120 s:\n{log_path.read_text()}")
    info = json.loads(runtime.read_text())
    return SuiteDaemon(proc, info["url"], info["token"], runtime, Path(live.text_adapter_dir), extra_dir,
                       log_path)


LONG_CONTEXT = 8192


class ColdDaemon:
    """The life-cycle suite's daemon: not running when the page starts, then started, stopped with
    SIGTERM or SIGKILL and started again when the page asks, always on the same port (the page
    connects by URL, as a web export does)."""

    def __init__(self, live: Any, origin: str, workdir: Path) -> None:
        from support import serve_command
        from tiny import build_tiny_model

        self.port = free_port()
        self.token = live.token
        self.runtime_file = workdir / "cold-daemon.json"
        self.workdir = workdir
        # The tiny model with a long context (the shared one has 512 positions): lines long enough
        # to be surely still streaming when the daemon is stopped under them.
        model = build_tiny_model(workdir / "tiny-long", "llama", max_positions=LONG_CONTEXT)
        self.argv = serve_command(model, live.text_adapter_dir, self.runtime_file, token=live.token, port=self.port,
                                  extra=["--allow-origin", origin, "--max-context", str(LONG_CONTEXT),
                                         "--max-new-tokens", str(LONG_CONTEXT)])
        self.process: subprocess.Popen[str] | None = None
        self.starts = 0
        # What each stop did: signal, exit code, seconds to exit, whether the runtime file was left.
        self.stops: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        from support import start_daemon

        self.starts += 1
        self.process = start_daemon(self.argv, self.runtime_file, self.workdir / f"cold-daemon-{self.starts}.log")

    def restart(self, signal_name: str) -> None:
        self.stop(signal_name)
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: the daemon answers nothing until the next stop sends SIGCONT (or SIGKILL)."""
        assert self.process is not None and self.process.poll() is None
        self.process.send_signal(signal.SIGSTOP)

    def stop(self, signal_name: str = "TERM") -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        started = time.monotonic()
        process.send_signal(getattr(signal, f"SIG{signal_name}"))
        process.send_signal(signal.SIGCONT)  # a frozen daemon handles its SIGTERM once it runs again
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        self.stops.append({"signal": signal_name, "code": code, "seconds": time.monotonic() - started,
                           "runtime_file_left": self.runtime_file.exists()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_welcome(daemon: SuiteDaemon) -> dict[str, Any]:
    """The welcome the reference Python client gets, to compare with what Godot saw."""
    from bridge.client import connect

    async def go() -> dict[str, Any]:
        async with connect(daemon.url, daemon.token, client_name="godot-suite-check") as client:
            return client.welcome.model_dump(mode="json")

    return asyncio.run(go())


# ---------------------------------------------------------------- one run of the suite


@dataclass
class GodotRun:
    """What one page run printed, parsed."""

    lines: list[tuple[str, str]]
    results: dict[str, dict[str, Any]]
    done: dict[str, Any] | None
    seconds: float
    daemon: SuiteDaemon | None
    daemon_error: str | None
    actions: list[dict[str, Any]]
    setup_error: str | None = None
    cold: ColdDaemon | None = None

    def errors(self) -> list[str]:
        return [text for kind, text in self.lines if kind == "err"]

    def log_tail(self, count: int = 60) -> str:
        return "\n".join(f"[{k}] {t[:400]}" for k, t in self.lines[-count:])

    def result(self, name: str) -> dict[str, Any]:
        """The result named `name`; fails the test with the page's log when it never came."""
        if self.setup_error:
            pytest.fail(f"the GDScript suite did not run: {self.setup_error}")
        if name not in self.results:
            pytest.fail(f"no result '{name}' from the GDScript suite (done: {self.done}); "
                        f"last lines of the page:\n{self.log_tail()}")
        return self.results[name]

    def passed(self, name: str, *, needs_daemon: bool = True) -> dict[str, Any]:
        """The data of result `name`, which must have passed (and the suite's daemon started)."""
        if needs_daemon and self.daemon is None:
            pytest.fail(f"the suite's daemon did not start: {self.daemon_error}")
        result = self.result(name)
        assert result["ok"], f"{name}: {result['detail']} {result['data']}"
        return result["data"]


def parse_lines(lines: list[tuple[str, str]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    results: dict[str, dict[str, Any]] = {}
    done = None
    for kind, text in lines:
        if kind != "out":
            continue
        if text.startswith("LORALOOM_TEST "):
            item = loads_godot_json(text[len("LORALOOM_TEST "):])
            results[item["name"]] = item
        elif text.startswith("LORALOOM_DONE "):
            done = loads_godot_json(text[len("LORALOOM_DONE "):])
    return results, done


def suite_project_settings() -> bytes:
    """The packed project's settings: the runner as main scene, no automatic connection."""
    return b"""config_version=5

[application]

config/name="loraloom GDScript suite"
run/main_scene="res://tests/runner.tscn"
config/features=PackedStringArray("4.6", "GL Compatibility")

[autoload]

Loraloom="*res://addons/loraloom/loraloom_client.gd"

[loraloom]

connection/auto_connect=false

[rendering]

renderer/rendering_method="gl_compatibility"
renderer/rendering_method.mobile="gl_compatibility"
"""


