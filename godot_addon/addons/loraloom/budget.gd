class_name LoraloomBudget
extends RefCounted
## The share of the GPU the game lets the daemon take, as the game sets it: the protocol's
## [code]set_budget[/code] (see [code]bridge/PROTOCOL.md[/code]).
##
## The daemon and the game's renderer share one GPU. With a budget the daemon keeps its steps to a
## duty cap (a fraction of wall time), to a number of tokens per second per priority class, and,
## in frame sync, to the part of each frame the game leaves free: the autoload then reports every
## frame start from its [code]_process[/code] (a [code]frame[/code] message, a few bytes).[br]
## Off by default. [LoraloomClient] reads it from Project Settings ([constant SETTINGS], under
## [code]loraloom/[/code]), sends it after every handshake (so a restarted daemon gets it again),
## and sends a changed one with [method LoraloomClient.set_budget]. A budget lasts as long as the
## connection: when the game goes, the daemon's own settings apply again.

## Project settings and their defaults; 0 turns a limit off.
const SETTINGS := {
	"budget/enabled": false,
	"budget/duty_cap": 0.0,
	"budget/tokens_per_s_player": 0.0,
	"budget/tokens_per_s_normal": 0.0,
	"budget/tokens_per_s_background": 0.0,
	"budget/frame_sync": false,
	"budget/frame_period_ms": 0.0,
	"budget/game_ms": 0.0,
	"budget/margin_ms": 0.5,
	"budget/overlap_ms": 0.0,
	"budget/report_measured_gpu_time": true,
	"budget/max_step_ms": 0.0,
}
## The priority classes of [code]tokens_per_s[/code].
const CLASSES := ["player", "normal", "background"]
## The frame time assumed when neither the game's max FPS nor the screen's refresh rate is known.
const DEFAULT_PERIOD_MS := 1000.0 / 60.0

## Send the budget at all (off: the daemon's own settings decide).
var enabled: bool = false
## The fraction of wall time the daemon's GPU work may occupy, in (0, 1]; 0: no cap.
var duty_cap: float = 0.0
## Tokens per second each priority class may generate ([code]player[/code],
## [code]normal[/code], [code]background[/code]); a missing or 0 entry: no cap.
var tokens_per_s: Dictionary = {}
## Run the daemon's steps in the part of each frame the game leaves free (the autoload reports
## frame starts).
var frame_sync: bool = false
## The frame time in ms; 0: from [member Engine.max_fps], else the screen's refresh rate.
var frame_period_ms: float = 0.0
## GPU time the game's own work takes from a frame's start, in ms.
var game_ms: float = 0.0
## Kept free before the next frame, in ms.
var margin_ms: float = 0.5
## How far past the margin a step may run into the next frame, in ms: that frame then shares the
## GPU for up to this long (a little slower while it is well under the period); 0: never.
var overlap_ms: float = 0.0
## In frame sync, send with each frame start the GPU time the renderer measured for the game's
## last frame ([method RenderingServer.viewport_get_measured_render_time_gpu]), so the daemon
## sizes the game's part from those instead of [member game_ms] (which applies where the
## renderer measures nothing).
var report_measured_gpu_time: bool = true
## The longest step while the budget is set, in ms (prompt chunks shrink); 0: no limit.
var max_step_ms: float = 0.0


## The budget in Project Settings (each key of [constant SETTINGS] under [param prefix]).
static func from_project_settings(prefix: String = "loraloom/") -> LoraloomBudget:
	var budget := LoraloomBudget.new()
	var value := func(key: String) -> Variant:
		return ProjectSettings.get_setting(prefix + key, SETTINGS[key])
	budget.enabled = value.call("budget/enabled")
	budget.duty_cap = value.call("budget/duty_cap")
	for priority: String in CLASSES:
		budget.tokens_per_s[priority] = float(value.call("budget/tokens_per_s_" + priority))
	budget.frame_sync = value.call("budget/frame_sync")
	budget.frame_period_ms = value.call("budget/frame_period_ms")
	budget.game_ms = value.call("budget/game_ms")
	budget.margin_ms = value.call("budget/margin_ms")
	budget.overlap_ms = value.call("budget/overlap_ms")
	budget.report_measured_gpu_time = value.call("budget/report_measured_gpu_time")
	budget.max_step_ms = value.call("budget/max_step_ms")
	return budget


## Whether there is anything to send: enabled, with at least one limit.
func is_active() -> bool:
	return enabled and not set_budget_fields().is_empty()


## Whether the autoload reports frame starts.
func reports_frames() -> bool:
	return enabled and frame_sync


## The frame time frame sync uses, in ms.
func period_ms() -> float:
	if frame_period_ms > 0.0:
		return frame_period_ms
	if Engine.max_fps > 0:
		return 1000.0 / Engine.max_fps
	var rate := DisplayServer.screen_get_refresh_rate()
	return 1000.0 / rate if rate > 0.0 else DEFAULT_PERIOD_MS


## The [code]set_budget[/code] fields of this budget (no [code]type[/code] or [code]id[/code]);
## limits that are off are left out, so an empty result means "no budget".
func set_budget_fields() -> Dictionary:
	var fields := {}
	if duty_cap > 0.0:
		fields["duty_cap"] = duty_cap
	var rates := {}
	for priority: String in CLASSES:
		var rate := float(tokens_per_s.get(priority, 0.0))
		if rate > 0.0:
			rates[priority] = rate
	if not rates.is_empty():
		fields["tokens_per_s"] = rates
	if frame_sync:
		fields["frame_sync"] = {"period_ms": period_ms(), "game_ms": game_ms, "margin_ms": margin_ms,
				"overlap_ms": overlap_ms}
	if max_step_ms > 0.0:
		fields["max_step_ms"] = max_step_ms
	return fields
