"""Running GDScript in the real Godot 4.6 runtime: the official web export in headless chromium.

This module owns the plumbing of the GDScript suite, none of it specific to loraloom:

- `pack_project`: writes a Godot .pck (format 3) from a project folder, with the global class
  cache (`.godot/global_script_class_cache.cfg`) that `class_name` needs, since no editor runs here.
- `WebHarness`: a loopback HTTP server that serves the engine, the page and the pack, and takes the
  lines that the page forwards from Godot's `print` (POST /log) as the back-channel to pytest.
- `launch_chromium`: headless chromium on that page, with a fresh profile.

The engine files come from `.ci/install-godot-deps.sh`; when they or chromium are missing the tests
fail with the command to run, they never skip.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "ENGINE_FILES",
    "GodotWebMissing",
    "WebHarness",
    "find_chromium",
    "find_engine_dir",
    "global_class_cache",
    "launch_chromium",
    "pack_project",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_FILES = ("index.wasm", "index.js", "index.audio.worklet.js", "index.audio.position.worklet.js")
INSTALL_HINT = "run `bash .ci/install-godot-deps.sh` first"

# The engine version the pack header announces; the runtime refuses packs from a newer engine.
GODOT_VERSION = (4, 6, 0)
_PACK_FORMAT = 3
_PACK_REL_FILEBASE = 1 << 1
_PACK_ALIGNMENT = 16


class GodotWebMissing(RuntimeError):
    """Chromium or the Godot web export is not installed."""


# ---------------------------------------------------------------- locating the tools


def find_engine_dir() -> Path:
    """The folder holding Godot's web export (index.wasm, index.js), or raise GodotWebMissing."""
    folder = Path(os.environ.get("LORALOOM_GODOT_WEB_DIR", REPO_ROOT / ".cache" / "godot-web"))
    missing = [name for name in ENGINE_FILES if not (folder / name).is_file()]
    if missing:
        raise GodotWebMissing(f"Godot web export incomplete in {folder} (missing {missing}): {INSTALL_HINT}")
    return folder


def find_chromium() -> str:
    """The chromium executable, or raise GodotWebMissing."""
    for name in (os.environ.get("LORALOOM_CHROMIUM", ""), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    raise GodotWebMissing(f"chromium not found: {INSTALL_HINT}")


# ---------------------------------------------------------------- the pack

_CLASS_NAME = re.compile(r"^class_name\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
_EXTENDS = re.compile(r"^extends\s+([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)
_TOOL = re.compile(r"^@tool\b", re.MULTILINE)
_ABSTRACT = re.compile(r"^@abstract\b", re.MULTILINE)


def global_class_cache(files: dict[str, bytes]) -> bytes:
    """The `.godot/global_script_class_cache.cfg` that the editor would write for these scripts.

    Without it, a release build knows no `class_name` (the editor normally writes it on import).
    """
    entries = []
    for path in sorted(files):
        if not path.endswith(".gd"):
            continue
        source = files[path].decode("utf-8")
        name = _CLASS_NAME.search(source)
        if not name:
            continue
        base = _EXTENDS.search(source)
        entries.append(
            "{\n"
            f'"base": &"{base.group(1) if base else "RefCounted"}",\n'
            f'"class": &"{name.group(1)}",\n'
            '"icon": "",\n'
            f'"is_abstract": {"true" if _ABSTRACT.search(source) else "false"},\n'
            f'"is_tool": {"true" if _TOOL.search(source) else "false"},\n'
            '"language": &"GDScript",\n'
            f'"path": "res://{path}"\n'
            "}"
        )
    return ("list=[" + ", ".join(entries) + "]\n").encode("utf-8")


def _pad(size: int, alignment: int) -> int:
    return (alignment - size % alignment) % alignment


def pack_project(
    files: dict[str, bytes], out: Path, *, version: tuple[int, int, int] = GODOT_VERSION
) -> Path:
    """Write `files` (paths relative to res://) as a format-3 .pck, adding the class cache.

    Layout, as Godot 4.4+ writes it: header (magic, format, engine version, flags, file base,
    directory offset, 16 reserved words), file data each aligned to 16 bytes, then the directory
    (count; per file: padded path, offset from the file base, size, md5, flags).
    """
    files = dict(files)
    files[".godot/global_script_class_cache.cfg"] = global_class_cache(files)
    header = struct.pack("<4sIIIII", b"GDPC", _PACK_FORMAT, *version, _PACK_REL_FILEBASE)
    header_size = len(header) + 16 + 16 * 4
    file_base = header_size + _pad(header_size, _PACK_ALIGNMENT)

    body = bytearray()
    directory = bytearray(struct.pack("<I", len(files)))
    for path in sorted(files):
        data = files[path]
        offset = len(body)
        body += data + b"\0" * _pad(len(data), _PACK_ALIGNMENT)
        encoded = path.encode("utf-8")
        encoded += b"\0" * _pad(len(encoded), 4)
        directory += struct.pack("<I", len(encoded)) + encoded
        directory += struct.pack("<QQ", offset, len(data)) + hashlib.md5(data).digest()
        directory += struct.pack("<I", 0)
    dir_offset = file_base + len(body)

    blob = bytearray(header)
    blob += struct.pack("<QQ", file_base, dir_offset) + b"\0" * 64
    blob += b"\0" * (file_base - len(blob))
    blob += body + directory
    out.write_bytes(bytes(blob))
    return out


def read_project(root: Path, *, skip: Iterable[str] = (".godot",)) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), leaving out editor folders."""
    skipped = set(skip)
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not (set(rel.parts) & skipped):
            files[rel.as_posix()] = path.read_bytes()
    return files


# ---------------------------------------------------------------- the page and its server

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>loraloom GDScript suite</title></head>
<body style="margin:0">
<canvas id="canvas" width="320" height="240"></canvas>
<script src="index.js"></script>
<script>
(function () {
  let seq = 0;
  // Every line goes back to pytest; the sequence number restores the order that parallel
  // POSTs may lose.
  function post(kind, text) {
    const body = JSON.stringify({seq: seq++, kind: kind, text: String(text)});
    return fetch("/log", {method: "POST", headers: {"Content-Type": "application/json"}, body: body})
      .catch(function () {});
  }
  window.addEventListener("error", function (e) { post("page", "js error: " + e.message); });
  window.addEventListener("unhandledrejection", function (e) { post("page", "js rejection: " + e.reason); });
  fetch("config.json").then(function (r) { return r.text(); }).then(function (text) {
    // Read from GDScript through JavaScriptBridge.eval.
    window.loraloomTestConfig = text;
    const engine = new Engine({
      executable: "index",
      mainPack: "__PACK__",
      canvasResizePolicy: 0,
      args: [],
      gdextensionLibs: [],
      focusCanvas: false,
    });
    return engine.startGame({
      onPrint: function () { post("out", Array.prototype.join.call(arguments, " ")); },
      onPrintError: function () { post("err", Array.prototype.join.call(arguments, " ")); },
      onExit: function (code) { post("page", "exit " + code); },
    });
  }).then(function () { post("page", "started"); },
          function (err) { post("page", "start failed: " + err); });
})();
</script>
</body>
</html>
"""

_MIME = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".pck": "application/octet-stream",
}


class WebHarness:
    """Serves one folder on 127.0.0.1 and collects the page's log lines.

    `on_line(kind, text)` runs on the server thread for every line as it arrives (used for
    actions the GDScript suite asks pytest to perform, such as editing the adapter folder).
    """

    def __init__(self, root: Path, *, on_line: Callable[[str, str], None] | None = None) -> None:
        self.root = root
        self._on_line = on_line
        self._lines: list[tuple[int, str, str]] = []
        self._cond = threading.Condition()
        harness = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass  # the suite's own log is what matters

            def _headers(self, status: int, content_type: str, length: int) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(length))
                self.send_header("Cache-Control", "no-store")
                # Cross-origin isolation: a threaded Godot build needs SharedArrayBuffer.
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.end_headers()

            def do_GET(self) -> None:
                name = self.path.split("?", 1)[0].lstrip("/") or "index.html"
                target = (harness.root / name).resolve()
                if harness.root.resolve() not in target.parents or not target.is_file():
                    self._headers(404, "text/plain", 0)
                    return
                data = target.read_bytes()
                self._headers(200, _MIME.get(target.suffix, "application/octet-stream"), len(data))
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                self._headers(204, "text/plain", 0)
                if self.path != "/log":
                    return
                try:
                    item = json.loads(raw)
                    harness._add(int(item["seq"]), str(item["kind"]), str(item["text"]))
                except (ValueError, KeyError, TypeError):
                    harness._add(-1, "page", f"unreadable log line: {raw[:200]!r}")

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WebHarness:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _add(self, seq: int, kind: str, text: str) -> None:
        with self._cond:
            self._lines.append((seq, kind, text))
            self._cond.notify_all()
        if self._on_line is not None:
            try:
                self._on_line(kind, text)
            except Exception as exc:  # an action that fails must show up, not kill the server
                with self._cond:
                    self._lines.append((-1, "page", f"harness action failed: {exc!r}"))
                    self._cond.notify_all()

    def lines(self) -> list[tuple[str, str]]:
        """All lines so far, in the page's order."""
        with self._cond:
            return [(kind, text) for _, kind, text in sorted(self._lines, key=lambda x: x[0])]

    def wait_for(self, predicate: Callable[[list[tuple[str, str]]], bool], timeout: float) -> bool:
        """Wait until `predicate(lines)` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                ordered = [(k, t) for _, k, t in sorted(self._lines, key=lambda x: x[0])]
                if predicate(ordered):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))


def stage_site(site: Path, engine_dir: Path, pack: Path, config: dict[str, object]) -> None:
    """Lay out the served folder: engine files, the page, the pack and the suite's config."""
    site.mkdir(parents=True, exist_ok=True)
    for name in ENGINE_FILES:
        target = site / name
        if not target.exists():
            try:
                os.link(engine_dir / name, target)  # 37 MB of wasm: no copy where a link will do
            except OSError:
                shutil.copyfile(engine_dir / name, target)
    if pack.parent != site:
        shutil.copyfile(pack, site / pack.name)
    (site / "index.html").write_text(PAGE.replace("__PACK__", pack.name), encoding="utf-8")
    (site / "config.json").write_text(json.dumps(config), encoding="utf-8")


def launch_chromium(url: str, profile_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Open `url` in headless chromium (software WebGL 2 through SwiftShader)."""
    argv = [
        find_chromium(),
        "--headless=new",
        "--no-sandbox",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        f"--user-data-dir={profile_dir}",
        # This machine has no network: keep chromium from trying to reach anything but the page.
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        # A hidden headless tab must still run Godot's main loop at full rate.
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
        "--disable-backgrounding-occluded-windows",
        "--window-size=320,240",
        url,
    ]
    log = log_path.open("wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate `proc` and its process group (chromium forks helpers), then reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait(timeout)
