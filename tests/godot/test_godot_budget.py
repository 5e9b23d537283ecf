"""The GPU budget through the Godot addon, in the real Godot 4.6 runtime against the real daemon
(suite_budget.gd of the one page run), checked against the daemon's own /healthz, which pytest reads
when the page asks (a "healthz" action) while the page holds the budget.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from godot_suite import GodotRun


def _health(run: GodotRun, label: str) -> dict[str, Any]:
    found = [a for a in run.actions if a.get("action") == "healthz" and a.get("label") == label]
    assert found and found[0].get("done"), run.actions
    return found[0]


def test_budget_is_off_by_default(godot_run: GodotRun) -> None:
    """With no budget settings nothing is sent: no budget, no frames, the daemon's own settings."""
    data = godot_run.passed("budget:off_by_default")
    assert not data["enabled"] and not data["active"] and not data["reports_frames"]
    assert not data["autoload_active"] and data["autoload_frames_sent"] == 0 and data["in_force"] == {}
    assert data["settings"]["budget/enabled"] is False
    assert 1.0 <= data["automatic_period_ms"] <= 1000.0  # no max FPS, no refresh rate: 60 Hz or the screen's
    assert data["automatic_fields"]["frame_sync"]["period_ms"] == data["automatic_period_ms"]
    budget = _health(godot_run, "default")["health"]["gpu_budget"]
    assert not budget["active"] and not budget["set_by_client"] and budget["frames"] == 0


def test_budget_is_set_and_frames_are_counted(godot_run: GodotRun) -> None:
    """set_budget sends the duty cap, the token rates and frame sync; the daemon's answer (also in
    budget_changed) and its /healthz hold them; every frame start the autoload reported is counted."""
    data = godot_run.passed("budget:set")
    sent, answer = data["sent"], data["answer"]
    assert sent["type"] == "set_budget" and answer["type"] == "budget"
    expected = {"duty_cap": 0.8, "max_step_ms": 8.0, "tokens_per_s": {"player": 500.0, "background": 50.5},
                "frame_sync": {"period_ms": 16.0, "game_ms": 4.0, "margin_ms": 0.5, "overlap_ms": 1.5}}
    for key, value in expected.items():
        assert sent[key] == value and answer[key] == value, key
    assert answer["set_by_client"] is True
    assert data["signalled"] == [answer] and data["in_force"] == answer
    action = _health(godot_run, "set")
    budget = action["health"]["gpu_budget"]
    assert budget["active"] and budget["set_by_client"] and budget["duty_cap"] == 0.8
    assert budget["tokens_per_s"] == {"player": 500.0, "background": 50.5}
    assert budget["frame_sync"]["period_ms"] == 16.0 and budget["max_step_ms"] == 8.0
    assert budget["frame_sync"]["overlap_ms"] == 1.5
    assert data["read"]["pong"]
    assert action["frames_sent"] >= data["frames_before"] + 30
    assert budget["frames"] >= action["frames_sent"] > 0


def test_budget_is_sent_again_after_a_reconnection(godot_run: GodotRun) -> None:
    """The daemon drops a budget with its connection; the autoload sends it again after the next
    handshake, and keeps reporting frames on the new connection."""
    data = godot_run.passed("budget:resent_after_reconnect")
    assert len(data["answers"]) == 1 and data["answers"][0]["duty_cap"] == 0.8
    action = _health(godot_run, "reconnected")
    budget = action["health"]["gpu_budget"]
    assert budget["set_by_client"] and budget["duty_cap"] == 0.8
    assert budget["frames"] >= action["frames_sent"] >= data["frames_at_connect"] + 30


def test_budget_frames_carry_the_measured_gpu_time(godot_run: GodotRun) -> None:
    """send_frame_start(game_ms) reports the game's GPU time of its last frame: with enough reports
    the daemon's part in use is theirs (2.0 over the budget's 3.5); NaN, -1, 5000 and INF go out as
    plain frames (counted, no error, the budget's 3.5 still in use). The autoload's own measurement
    in _process matches the renderer's: none where it measures 0 (the budget's part in use then)."""
    assert godot_run.passed("budget:off_by_default")["settings"]["budget/report_measured_gpu_time"] is True
    data = godot_run.passed("budget:measured_gpu_time")
    assert data["answer"]["frame_sync"]["game_ms"] == 3.5
    assert data["bad_sent"] == 40 and data["good_sent"] == 10
    assert data["errors"] == [], "a time out of range reached the daemon"
    bad = _health(godot_run, "measured_bad")
    budget = bad["health"]["gpu_budget"]
    assert budget["frame_sync"]["game_ms"] == 3.5 and budget["game_ms_in_use"] == 3.5
    assert budget["frames"] >= bad["frames_sent"] + data["bad_sent"], "every plain frame counted"
    assert _health(godot_run, "measured")["health"]["gpu_budget"]["game_ms_in_use"] == 2.0

    # While the budget of budget:set was in force (report_measured_gpu_time on) the autoload sent
    # what the renderer measured, if anything.
    in_use = _health(godot_run, "reconnected")["health"]["gpu_budget"]["game_ms_in_use"]
    if data["renderer_gpu_ms"] > 0.0:
        assert data["autoload_measured_ms"] > 0.0 and 0.0 < in_use <= 1000.0
    else:
        assert data["autoload_measured_ms"] == -1.0 and in_use == 4.0


def test_budget_cleared_and_out_of_bounds(godot_run: GodotRun) -> None:
    """A disabled budget clears the one in force and stops the frame reports; a duty cap above 1
    fails with bad_message before it is sent, the connection untouched."""
    data = godot_run.passed("budget:cleared")
    assert set(data["sent"]) == {"type", "id"}
    assert data["answer"]["set_by_client"] is False and data["answer"].get("duty_cap") is None
    assert data["frames_later"] == data["frames_after_clear"]
    assert not _health(godot_run, "cleared")["health"]["gpu_budget"]["active"]
    refused = godot_run.passed("budget:refused")
    assert refused["code"] == "bad_message" and "duty_cap" in refused["message"]
    assert refused["still_usable"]
