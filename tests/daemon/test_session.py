"""`Session` without sockets: frames in, actions out (the server only performs them)."""

from __future__ import annotations

import msgpack

from bridge import messages as m
from bridge.codec import encode
from daemon.session import Close, RequestKey, Send, Session, Start, Stop

LIMITS = m.Limits(max_frame_bytes=4096, max_inflight_per_connection=2, max_prompt_tokens=100, max_new_tokens=50,
                  max_adapters_per_request=4)
ADAPTER = m.AdapterInfo(name="pirate", kind="text", status="ready", version=1)


class FakeView:
    def welcome(self) -> m.Welcome:
        return m.Welcome(protocol=m.PROTOCOL_VERSION, server="test", limits=LIMITS, adapters=[ADAPTER])

    def adapter_list(self) -> list[m.AdapterInfo]:
        return [ADAPTER]

    def limits(self) -> m.Limits:
        return LIMITS


def frame(**fields: object) -> bytes:
    return msgpack.packb(fields)


def session(authenticated: bool = True) -> Session:
    s = Session(FakeView(), 7, token="secret")
    if authenticated:
        (welcome,) = s.receive(encode(m.Hello(protocol=m.PROTOCOL_VERSION, token="secret")))
        assert isinstance(welcome, Send) and welcome.message.type == "welcome"
    return s


def sent(actions: list) -> list:
    return [a.message for a in actions if isinstance(a, Send)]


def test_handshake_first_then_refusals_close_the_connection() -> None:
    """A first frame that is not hello, a wrong token or protocol: an error, then a policy close; nothing after."""
    s = session(authenticated=False)
    actions = s.receive(frame(type="ping", id="p"))
    assert [type(a) for a in actions] == [Send, Close] and actions[0].message.code == "handshake_required"
    assert s.receive(encode(m.Hello(protocol=m.PROTOCOL_VERSION, token="secret"))) == []
    wrong = session(authenticated=False).receive(encode(m.Hello(protocol=m.PROTOCOL_VERSION, token="nope")))
    assert wrong[0].message.code == "unauthorized" and isinstance(wrong[1], Close)
    old = session(authenticated=False).receive(frame(type="hello", protocol=99, token="secret"))
    assert old[0].message.code == "unsupported_version"


def test_generate_starts_a_request_and_its_result_ends_it() -> None:
    s = session()
    (start,) = s.receive(encode(m.Generate(id="a", prompt="Ahoy")))
    assert isinstance(start, Start) and start.key == RequestKey(7, "a") and start.message.prompt == "Ahoy"
    assert s.inflight == {"a": "text"}
    chunk = m.Chunk(id="a", text="Arr", index=0, tokens=1)
    assert sent(s.deliver(chunk)) == [chunk] and "a" in s.inflight
    result = m.Result(id="a", text="Arr", finish_reason="stop", prompt_tokens=2, completion_tokens=1,
                      timings=m.Timings(queued_ms=0, total_ms=1))
    assert sent(s.deliver(result)) == [result] and s.inflight == {}


def test_duplicate_ids_the_inflight_limit_and_cancel() -> None:
    s = session()
    s.receive(encode(m.Generate(id="a", prompt="x")))
    assert sent(s.receive(encode(m.Generate(id="a", prompt="x"))))[0].code == "duplicate_id"
    s.receive(encode(m.GenerateImage(id="b", prompt="x")))
    assert sent(s.receive(encode(m.Generate(id="c", prompt="x"))))[0].code == "too_many_requests"
    assert s.receive(encode(m.Cancel(id="b"))) == [Stop(RequestKey(7, "b"), "image")]
    assert sent(s.receive(encode(m.Cancel(id="zz"))))[0].code == "unknown_request"


def test_bad_frames_are_answered_and_the_session_goes_on() -> None:
    s = session()
    assert sent(s.receive("text"))[0].code == "bad_frame"
    assert sent(s.receive(b"\xc1"))[0].code == "bad_frame"
    too_big = sent(s.receive(frame(type="ping", id="p", pad="x" * 5000)))
    assert too_big[0].code == "frame_too_large"
    bad = sent(s.receive(frame(type="generate", id="g", prompt="x", top_k=-1)))
    assert bad[0].code == "bad_message" and bad[0].id == "g"
    assert sent(s.receive(frame(type="ping", id="p")))[0].type == "pong"


def test_adapter_events_reach_subscribers_only() -> None:
    s = session()
    event = m.AdapterEvent(event="updated", adapter=ADAPTER, previous_version=1)
    assert s.deliver(event) == []
    reply = sent(s.receive(encode(m.Subscribe(id="s"))))
    assert reply[0].type == "adapters" and reply[0].adapters == [ADAPTER]
    assert sent(s.deliver(event)) == [event]


def test_closing_stops_every_request_in_flight_once() -> None:
    s = session()
    s.receive(encode(m.Generate(id="a", prompt="x")))
    s.receive(encode(m.GenerateImage(id="b", prompt="x")))
    assert set(s.closed()) == {Stop(RequestKey(7, "a"), "text"), Stop(RequestKey(7, "b"), "image")}
    assert s.closed() == [] and s.receive(frame(type="ping", id="p")) == []
    assert s.deliver(m.Chunk(id="a", text="late", index=0, tokens=1)) == []
