extends "res://tests/suite_base.gd"
## The GPU budget against the real daemon: off by default, set from a [LoraloomBudget] (the
## daemon's answer), frame starts reported from the autoload's _process and counted by the
## daemon, sent again after a reconnection, frames carrying the game's GPU time (which the daemon
## then uses as the game's part of a frame; times out of range left out), cleared, and a budget out
## of bounds refused before it is sent. pytest reads the daemon's /healthz (gpu_budget) when asked
## (a "healthz" action) while the budget is in force. Runs after suite_structured.gd, on the
## autoload.

## How long the budget stays as it is after asking pytest to read /healthz: the action is done
## when pytest reads the line (a loopback POST, then a loopback GET), long before this.
const HOLD_S := 3.0
const FRAMES := 30
## Frames sent with each measured time (more than the 4 the daemon needs before it uses them).
const MEASURED_FRAMES := 10

var _client: LoraloomClient
var _answers: Array = []


## Runs the suite, reporting through [param runner].
func run(runner: Node) -> void:
	_runner = runner
	_client = get_node_or_null("/root/Loraloom") as LoraloomClient
	if runner.get("config").get("daemon") == null or _client == null:
		_report("budget:configured", false, "no daemon or autoload")
		return
	if not await _until(func() -> bool: return _client.is_ready(), 30.0):
		_report("budget:configured", false, "the autoload is not connected")
		return
	_client.budget_changed.connect(func(answer: Dictionary) -> void: _answers.append(answer))
	await _check_off_by_default()
	if await _check_set():
		await _check_reconnect()
	await _check_measured()
	await _check_cleared()
	await _check_refused()


## Asks pytest to read /healthz now (under [param label]) and keeps things as they are meanwhile.
## A ping first: the daemon handles a connection's frames in order, so every frame reported
## before it has been counted when its pong comes back.
func _read_healthz(label: String) -> Dictionary:
	var pong := await _client.ping().wait(10.0)
	var sent := _client.frames_sent
	_runner.call("request_action", "healthz", {"label": label, "frames_sent": sent})
	await get_tree().create_timer(HOLD_S).timeout
	return {"pong": pong.ok, "frames_sent_before": sent}


func _budget() -> LoraloomBudget:
	var budget := LoraloomBudget.new()
	budget.enabled = true
	budget.duty_cap = 0.8
	budget.tokens_per_s = {"player": 500, "background": 50.5}
	budget.frame_sync = true
	budget.frame_period_ms = 16.0
	budget.game_ms = 4.0
	budget.overlap_ms = 1.5
	budget.max_step_ms = 8.0
	return budget


func _check_off_by_default() -> void:
	var from_settings := LoraloomBudget.from_project_settings()
	var automatic := LoraloomBudget.new()
	automatic.frame_sync = true
	automatic.enabled = true
	var read := await _read_healthz("default")
	_report("budget:off_by_default", not _client.budget.is_active(), "", {
		"enabled": from_settings.enabled,
		"active": from_settings.is_active(),
		"reports_frames": from_settings.reports_frames(),
		"autoload_active": _client.budget.is_active(),
		"autoload_frames_sent": _client.frames_sent,
		"in_force": _client.budget_in_force,
		"settings": LoraloomBudget.SETTINGS,
		"automatic_period_ms": automatic.period_ms(),
		"automatic_fields": automatic.set_budget_fields(),
		"read": read,
	})


func _check_set() -> bool:
	var budget := _budget()
	var frames_before := _client.frames_sent
	var request := _client.set_budget(budget)
	var answered := await _answer(request)
	var frames: bool = await _until(func() -> bool:
		return _client.frames_sent >= frames_before + FRAMES, 30.0)
	var read := await _read_healthz("set")
	var ok := answered != null and answered.ok and frames
	_report("budget:set", ok, answered.error_message if answered != null else "not sent", {
		"sent": answered.message if answered != null else {},
		"answer": answered.result if answered != null else {},
		"signalled": _answers.duplicate(),
		"in_force": _client.budget_in_force,
		"frames_before": frames_before,
		"read": read,
	})
	return ok


func _check_reconnect() -> void:
	var answers_before := _answers.size()
	_client.disconnect_from_daemon()
	_client.connect_to_daemon()
	var up: bool = await _until(func() -> bool:
		return _client.is_ready() and _answers.size() > answers_before, 30.0)
	var frames_at_connect := _client.frames_sent
	await _until(func() -> bool: return _client.frames_sent >= frames_at_connect + FRAMES, 30.0)
	var read := await _read_healthz("reconnected")
	_report("budget:resent_after_reconnect", up, "state %d" % _client.state, {
		"answers": _answers.slice(answers_before),
		"frames_at_connect": frames_at_connect,
		"read": read,
	})


## Frame starts with the game's measured GPU time: times out of 0..1000 (and NaN) go out as plain
## frames, the daemon keeping the budget's game_ms; then 2 ms a frame becomes the part in use. The
## web renderer's own measurement is recorded for pytest (it may measure nothing: 0).
func _check_measured() -> void:
	var viewport := get_viewport().get_viewport_rid()
	var renderer_ms := RenderingServer.viewport_get_measured_render_time_gpu(viewport)
	var autoload_ms: float = _client._measured_gpu_ms()
	var budget := _budget()
	budget.game_ms = 3.5
	# The autoload's own frame starts carry no time meanwhile: only the times sent here count.
	budget.report_measured_gpu_time = false
	var errors: Array = []
	var on_message := func(message: Dictionary) -> void:
		if message.get("type") == LoraloomProtocol.ERROR:
			errors.append(message)
	_client.message_received.connect(on_message)
	var answered := await _answer(_client.set_budget(budget))
	var bad_sent := 0
	for value: float in [NAN, -1.0, 5000.0, INF]:
		for i in MEASURED_FRAMES:
			if _client._link.send_frame_start(value):
				bad_sent += 1
	var bad_read := await _read_healthz("measured_bad")
	var good_sent := 0
	for i in MEASURED_FRAMES:
		if _client._link.send_frame_start(2.0):
			good_sent += 1
	var good_read := await _read_healthz("measured")
	_client.message_received.disconnect(on_message)
	var ok := answered != null and answered.ok and bad_sent == 4 * MEASURED_FRAMES
	_report("budget:measured_gpu_time", ok and good_sent == MEASURED_FRAMES, "", {
		"answer": answered.result if answered != null else {},
		"bad_sent": bad_sent,
		"good_sent": good_sent,
		"errors": errors,
		"renderer_gpu_ms": renderer_ms,
		"autoload_measured_ms": autoload_ms,
		"bad_read": bad_read,
		"good_read": good_read,
	})


func _check_cleared() -> void:
	var request := _client.set_budget(LoraloomBudget.new())
	var answered := await _answer(request)
	var frames_after := _client.frames_sent
	for i in 10:
		await get_tree().process_frame
	var read := await _read_healthz("cleared")
	_report("budget:cleared", answered != null and answered.ok, "", {
		"sent": answered.message if answered != null else {},
		"answer": answered.result if answered != null else {},
		"frames_after_clear": frames_after,
		"frames_later": _client.frames_sent,
		"read": read,
	})


func _check_refused() -> void:
	var budget := _budget()
	budget.duty_cap = 1.5
	var request := _client.set_budget(budget)
	var answered := await _answer(request)
	# Back to no budget, so that nothing after this suite runs under one.
	var cleared := _client.set_budget(LoraloomBudget.new())
	if cleared != null:
		await cleared.wait(10.0)
	var pong := await _client.ping().wait(10.0)
	_report("budget:refused", answered != null and not answered.ok, "", {
		"code": answered.error_code if answered != null else "",
		"message": answered.error_message if answered != null else "",
		"still_usable": pong.ok,
	})


func _answer(request: LoraloomRequest) -> LoraloomRequest:
	if request == null:
		return null
	return await request.wait(10.0)
