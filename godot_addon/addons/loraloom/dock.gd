@tool
extends VBoxContainer
## The Loraloom editor dock: connection state, models, adapters and live adapter events of the
## game being played.

const MAX_LOG_LINES := 200
const STATE_NAMES := ["disconnected", "connecting", "handshaking", "connected"]

var _status: Label
var _models: Label
var _adapters: ItemList
var _log: RichTextLabel
var _adapter_infos: Dictionary = {}


func _init() -> void:
	custom_minimum_size = Vector2(200, 240)
	_status = Label.new()
	_status.text = "Not playing"
	add_child(_status)
	_models = Label.new()
	_models.autowrap_mode = TextServer.AUTOWRAP_WORD_SMART
	add_child(_models)
	var adapters_title := Label.new()
	adapters_title.text = "Adapters"
	add_child(adapters_title)
	_adapters = ItemList.new()
	_adapters.custom_minimum_size = Vector2(0, 90)
	add_child(_adapters)
	var log_title := Label.new()
	log_title.text = "Events"
	add_child(log_title)
	_log = RichTextLabel.new()
	_log.scroll_following = true
	_log.size_flags_vertical = Control.SIZE_EXPAND_FILL
	add_child(_log)


## A play session started.
func session_started() -> void:
	_status.text = "Playing: waiting for the Loraloom autoload"
	_append("game started")


## The play session ended.
func session_stopped() -> void:
	_status.text = "Not playing"
	_append("game stopped")


## One event reported by the game's autoload.
func show_event(kind: String, state: int, frame: Dictionary) -> void:
	_status.text = "Daemon: %s" % STATE_NAMES[clampi(state, 0, STATE_NAMES.size() - 1)]
	match kind:
		LoraloomProtocol.WELCOME:
			_show_welcome(frame)
		LoraloomProtocol.ADAPTERS:
			_adapter_infos.clear()
			for info: Variant in frame.get("adapters", []):
				if info is Dictionary:
					_adapter_infos[str(info.get("name", ""))] = info
			_refresh_adapters()
		LoraloomProtocol.ADAPTER_EVENT:
			var info: Dictionary = frame.get("adapter", {})
			var adapter_name := str(info.get("name", ""))
			if frame.get("event") == LoraloomProtocol.ADAPTER_EVENT_KIND_REMOVED:
				_adapter_infos.erase(adapter_name)
			else:
				_adapter_infos[adapter_name] = info
			_refresh_adapters()
			var line := "%s %s v%s" % [adapter_name, frame.get("event"), info.get("version")]
			if frame.get("reason") != null:
				line += ": %s" % frame.get("reason")
			_append(line)
		LoraloomProtocol.RESULT:
			_append("%s finished (%s, %s tokens)" % [
				frame.get("id"), frame.get("finish_reason"), frame.get("completion_tokens")])
		LoraloomProtocol.ERROR:
			_append("%s failed: %s %s" % [frame.get("id"), frame.get("code"), frame.get("message")])
		"connection_failed", "disconnected":
			_append("%s: %s" % [kind, frame.get("reason", "")])


func _show_welcome(frame: Dictionary) -> void:
	var lines := PackedStringArray(["loraloom %s" % frame.get("server", "?")])
	for key: String in ["text_model", "image_model"]:
		var model: Variant = frame.get(key)
		if model is Dictionary:
			var placeholder := " (placeholder)" if model.get("placeholder", false) else ""
			lines.append("%s on %s%s" % [model.get("name"), model.get("device"), placeholder])
	_models.text = "\n".join(lines)
	_adapter_infos.clear()
	for info: Variant in frame.get("adapters", []):
		if info is Dictionary:
			_adapter_infos[str(info.get("name", ""))] = info
	_refresh_adapters()
	_append("connected")


func _refresh_adapters() -> void:
	_adapters.clear()
	var names := _adapter_infos.keys()
	names.sort()
	for adapter_name: String in names:
		var info: Dictionary = _adapter_infos[adapter_name]
		_adapters.add_item("%s [%s] %s v%s" % [
			adapter_name, info.get("kind"), info.get("status"), info.get("version")])


func _append(line: String) -> void:
	var stamp := Time.get_time_string_from_system()
	_log.add_text("%s  %s\n" % [stamp, line])
	while _log.get_paragraph_count() > MAX_LOG_LINES:
		_log.remove_paragraph(0)
