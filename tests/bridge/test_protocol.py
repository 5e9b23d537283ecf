"""The protocol's generated files are up to date and the codec refuses bad frames with stable codes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import msgpack
import pytest

from bridge import codec, gen
from bridge import messages as m
from bridge.discovery import RuntimeInfo, read_runtime_file, remove_runtime_file, write_runtime_file
from bridge.errors import DaemonNotFound


def test_generated_files_are_fresh() -> None:
    """`python -m bridge.gen` has been run since the models last changed: PROTOCOL.md, the golden
    frames, the C# classes and the GDScript schema all match them, and none is left over."""
    assert gen.stale() == [], "run `python -m bridge.gen` and commit the result"


def test_every_message_type_has_a_golden_frame() -> None:
    types = {json.loads((gen.FRAMES_DIR / f"{n}.json").read_text())["type"] for n in gen.EXAMPLES}
    assert types == {cls.model_fields["type"].default for cls in gen.CLIENT_TYPES + gen.SERVER_TYPES}


@pytest.mark.parametrize("name", sorted(gen.EXAMPLES))
def test_golden_frames_decode_to_their_json_and_reencode_exactly(name: str) -> None:
    frame = (gen.FRAMES_DIR / f"{name}.msgpack").read_bytes()
    client_types = {cls.model_fields["type"].default for cls in gen.CLIENT_TYPES}
    is_client = gen.EXAMPLES[name].type in client_types  # type: ignore[attr-defined]
    msg = codec.decode_client(frame) if is_client else codec.decode_server(frame)
    assert codec.encode(msg) == frame
    value = json.loads((gen.FRAMES_DIR / f"{name}.json").read_text())
    assert gen._to_json(msgpack.unpackb(frame)) == value


@pytest.mark.parametrize(
    ("frame", "code", "request_id", "fragment"),
    [
        (b"\xc1", "bad_frame", None, "not valid msgpack"),
        (msgpack.packb([1, 2]), "bad_frame", None, "one msgpack map"),
        (msgpack.packb({"id": "a"}), "bad_message", "a", "no 'type'"),
        (msgpack.packb({"type": "dance", "id": "b"}), "bad_message", "b", "unknown message type 'dance'"),
        (msgpack.packb({"type": "generate", "id": "c", "prompt": "x", "temperature": "hot"}), "bad_message", "c",
         "temperature"),
        (msgpack.packb({"type": "generate", "id": "d", "prompt": "x", "colour": 1}), "bad_message", "d", "colour"),
        (msgpack.packb({"type": "generate", "id": "e"}), "bad_message", "e", "exactly one of"),
        (msgpack.packb({"type": "generate", "id": "f", "prompt": "x", "adapters": [{"name": "../etc"}]}),
         "bad_message", "f", "adapters.0.name"),
        (msgpack.packb({1: 2}), "bad_frame", None, "not valid msgpack"),
    ],
)
def test_bad_frames_get_codes_and_ids(frame: bytes, code: str, request_id: str | None, fragment: str) -> None:
    with pytest.raises(codec.FrameError) as info:
        codec.decode_client(frame)
    assert info.value.code.value == code
    assert info.value.request_id == request_id
    assert fragment in info.value.message


def test_adapter_names_are_identifiers_not_paths() -> None:
    for bad in ["../x", "a/b", ".hidden", "", "x" * 65, "a\\b"]:
        with pytest.raises(ValueError):
            m.AdapterRef(name=bad)
    for good in ["pirate", "elf-2", "v1.2_final", "_x"]:
        assert m.AdapterRef(name=good).name == good


def test_runtime_file_is_private_and_removed_only_by_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "rt" / "daemon.json"
    info = RuntimeInfo(url="ws://127.0.0.1:1", host="127.0.0.1", port=1, token="t", pid=os.getpid(), version="0",
                       protocol=1)
    write_runtime_file(info, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_runtime_file(path) == info
    remove_runtime_file(path, pid=os.getpid() + 1)
    assert path.exists()
    remove_runtime_file(path, pid=os.getpid())
    assert not path.exists()
    with pytest.raises(DaemonNotFound, match="no daemon is running"):
        read_runtime_file(path)


def test_client_side_errors_carry_their_own_codes() -> None:
    """DaemonNotFound and ConnectionClosed say what happened, not `internal`; codes the daemon sends map to classes."""
    from bridge.errors import CLIENT_ONLY, MEANINGS, ConnectionClosed, DaemonNotFound, ErrorCode, error_for_code

    assert str(DaemonNotFound("cannot reach ws://x")).startswith("daemon_not_found: ")
    assert ConnectionClosed("gone").code == ErrorCode.CONNECTION_CLOSED
    assert set(MEANINGS) == set(ErrorCode) and set(ErrorCode) >= CLIENT_ONLY
    assert type(error_for_code("unknown_adapter", "x")).__name__ == "AdapterError"
    assert error_for_code("no_such_code", "x").code == ErrorCode.INTERNAL
