extends Node
## What the suites that talk to a daemon share: reporting a result through the runner, and
## waiting frame by frame for a condition.

var _runner: Node


func _report(test_name: String, ok: bool, detail: String, data: Dictionary = {}) -> void:
	_runner.call("report", test_name, ok, detail, data)


## Waits until [param condition] holds, checking every frame; false after [param timeout_s].
func _until(condition: Callable, timeout_s: float) -> bool:
	var deadline := Time.get_ticks_msec() + int(timeout_s * 1000.0)
	while not condition.call():
		if Time.get_ticks_msec() > deadline:
			return false
		await get_tree().process_frame
	return true
