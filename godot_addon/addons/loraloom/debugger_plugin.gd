@tool
extends EditorDebuggerPlugin
## Receives the running game's loraloom events (sent by the autoload through [EngineDebugger])
## and hands them to the dock.

## The dock that shows the events (set by the plugin).
var dock: Control


func _has_capture(capture: String) -> bool:
	return capture == "loraloom"


func _capture(message: String, data: Array, _session_id: int) -> bool:
	if message != "loraloom:event" or data.size() < 3 or dock == null:
		return false
	dock.call("show_event", str(data[0]), int(data[1]), data[2])
	return true


func _setup_session(session_id: int) -> void:
	var session := get_session(session_id)
	if session == null or dock == null:
		return
	session.started.connect(dock.call.bind("session_started"))
	session.stopped.connect(dock.call.bind("session_stopped"))
