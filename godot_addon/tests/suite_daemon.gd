extends Node
## The addon against a real daemon: connecting through the runtime file, streaming chats on
## several adapters at once, stop, errors, history, images, live adapter changes and the demo.
##
## pytest starts the daemon (tiny random model: the text is gibberish, so only structure is
## checked) and passes its address, token and adapter names in the configuration.

const TEXT_TIMEOUT := 120.0

var _runner: Node
var _daemon: Dictionary
var _client: LoraloomClient


## Runs the suite, reporting through [param runner].
func run(runner: Node) -> void:
	_runner = runner
	_daemon = runner.get("config").get("daemon", {})
	if _daemon.is_empty():
		runner.call("report", "daemon:configured", false, "pytest gave no daemon")
		return
	_client = get_node_or_null("/root/Loraloom") as LoraloomClient
	if _client == null:
		runner.call("report", "daemon:configured", false, "the Loraloom autoload is missing")
		return
	if not await _connect():
		return
	await _check_adapter_list()
	await _check_two_adapters()
	await _check_stop()
	await _check_unknown_adapter()
	await _check_history_and_await()
	await _check_image()
	await _check_adapter_changed()
	await _check_demo()
	await _check_bad_token()
	await _check_reconnect()


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


func _new_chat(adapter: String, max_tokens: int) -> LoraloomChat:
	var chat := LoraloomChat.new()
	chat.adapter = adapter
	chat.max_tokens = max_tokens
	chat.temperature = 0.9
	add_child(chat)
	return chat


## Records one chat node's signals into a dictionary the checks read.
func _record(chat: LoraloomChat) -> Dictionary:
	var seen := {"tokens": {}, "finished": {}, "failed": {}}
	chat.response_updated.connect(func(request_id: String, token: String) -> void:
		var tokens: Array = seen["tokens"].get(request_id, [])
		tokens.append(token)
		seen["tokens"][request_id] = tokens)
	chat.response_finished.connect(func(request_id: String, text: String) -> void:
		seen["finished"][request_id] = text)
	chat.request_failed.connect(func(request_id: String, code: String, message: String) -> void:
		seen["failed"][request_id] = [code, message])
	return seen


func _connect() -> bool:
	# Through the runtime file, as a game finds a local daemon (the web has no real one to
	# read, so the daemon's file is copied into user://).
	var path := "user://daemon.json"
	var file := FileAccess.open(path, FileAccess.WRITE)
	file.store_string(str(_daemon.get("runtime_json", "")))
	file.close()
	var events := {"connected": 0, "failed": []}
	_client.connected.connect(func(_welcome: Dictionary) -> void: events["connected"] += 1)
	_client.connection_failed.connect(func(reason: String) -> void: events["failed"].append(reason))
	_client.url = ""
	_client.token = ""
	_client.runtime_file = path
	_client.connect_to_daemon()
	# Sent while still connecting: must wait for the handshake, then go out.
	var early := _client.ping()
	var up: bool = await _until(func() -> bool: return _client.is_ready(), 30.0)
	var welcome := _client.welcome
	var text_model: Variant = welcome.get("text_model")
	var image_model: Variant = welcome.get("image_model")
	_report("client:connect", up and events["connected"] == 1,
			"state %d, failures %s" % [_client.state, events["failed"]], {
				"protocol": welcome.get("protocol"),
				"server": welcome.get("server"),
				"text_model": text_model.get("name") if text_model is Dictionary else null,
				"image_model": image_model.get("name") if image_model is Dictionary else null,
				"welcome_adapters": (welcome.get("adapters", []) as Array).map(
					func(info: Dictionary) -> String: return info.get("name")),
			})
	await early.wait(10.0)
	_report("client:queued_request", early.ok and early.result.get("type") == "pong",
			"%s %s" % [early.error_code, early.error_message],
			{"server_time_is_float": typeof(early.result.get("server_time")) == TYPE_FLOAT})
	return up


func _check_adapter_list() -> void:
	var expected: Array = _daemon.get("adapters", [])
	# The subscribe answer refreshes the list shortly after the welcome.
	var listed: bool = await _until(func() -> bool:
		return expected.all(func(n: String) -> bool: return _client.adapters.has(n)), 15.0)
	var refresh := _client.refresh_adapters()
	await refresh.wait(10.0)
	_report("client:adapters", listed and refresh.ok, refresh.error_message, {
		"names": Array(_client.get_adapter_names("text")),
		"listed": (refresh.result.get("adapters", []) as Array).map(
			func(info: Dictionary) -> String: return info.get("name")),
	})


func _check_two_adapters() -> void:
	var names: Array = _daemon.get("adapters", [])
	var first := _new_chat(names[0], 24)
	var second := _new_chat(names[1], 24)
	# Seeded: the random test model's answer is then the same every run (an unseeded one can
	# end on its first token and leave nothing to stream).
	first.random_seed = 7
	second.random_seed = 8
	var seen_first := _record(first)
	var seen_second := _record(second)
	var id_first := first.ask("Ahoy! Who goes there?")
	var id_second := second.ask("Hello, traveller.")
	var in_flight_together := first.is_busy() and second.is_busy()
	var done_first := await first.wait(id_first, TEXT_TIMEOUT)
	var done_second := await second.wait(id_second, TEXT_TIMEOUT)
	var data := {"in_flight_together": in_flight_together, "ids": [id_first, id_second]}
	for entry: Array in [[done_first, seen_first, names[0]], [done_second, seen_second, names[1]]]:
		var request: LoraloomRequest = entry[0]
		var seen: Dictionary = entry[1]
		var tokens := PackedStringArray(seen["tokens"].get(request.id, []))
		data[entry[2]] = {
			"ok": request.ok,
			"error": request.error_code,
			"chunks": tokens.size(),
			"joined_tokens": "".join(tokens),
			"finished_text": seen["finished"].get(request.id),
			"text": request.text,
			"finish_reason": request.finish_reason,
			"adapter_versions": request.result.get("adapter_versions", {}),
			"completion_tokens": request.result.get("completion_tokens"),
			"sent_adapters": request.message.get("adapters"),
		}
	_report("chat:two_adapters", done_first.ok and done_second.ok,
			"%s / %s" % [done_first.error_message, done_second.error_message], data)
	first.queue_free()
	second.queue_free()


func _check_stop() -> void:
	# The random model may end an answer by itself before the stop lands; such an attempt proves
	# nothing either way, so a few are made. A repetition penalty keeps the end-of-turn token
	# (present in the prompt) unlikely, which makes long answers the rule.
	var attempts: Array = []
	for attempt in 3:
		var outcome := await _stop_once(attempt)
		attempts.append(outcome)
		if outcome["finish_reason"] == "cancelled" or not outcome["ok"]:
			break
	var last: Dictionary = attempts[-1]
	_report("chat:stop", last["ok"] and last["streaming"], str(last.get("error", "")),
			{"attempts": attempts})


func _stop_once(attempt: int) -> Dictionary:
	var names: Array = _daemon.get("adapters", [])
	var limits: Dictionary = _client.welcome.get("limits", {})
	var chat := _new_chat(names[attempt % names.size()],
			mini(int(limits.get("max_new_tokens", 200)), 200))
	chat.temperature = 0.8
	chat.repetition_penalty = 5.0
	var seen := _record(chat)
	var request_id := chat.ask("Tell me a very long story about the sea, part %d." % attempt)
	var streaming: bool = await _until(func() -> bool: return seen["tokens"].has(request_id), 60.0)
	chat.stop()
	var request := await chat.wait(request_id, 30.0)
	var tokens := PackedStringArray(seen["tokens"].get(request_id, []))
	chat.queue_free()
	return {
		"ok": request.ok,
		"error": request.error_message,
		"streaming": streaming,
		"finish_reason": request.finish_reason,
		"chunks": tokens.size(),
		"joined_tokens": "".join(tokens),
		"finished_text": seen["finished"].get(request_id),
		"completion_tokens": request.result.get("completion_tokens"),
		"max_tokens": chat.max_tokens,
	}


func _check_unknown_adapter() -> void:
	var chat := _new_chat(str(_daemon.get("unknown_adapter", "ghost")), 8)
	var seen := _record(chat)
	var request_id := chat.ask("Anyone there?")
	var request := await chat.wait(request_id, 30.0)
	var failure: Array = seen["failed"].get(request_id, [])
	_report("chat:unknown_adapter", not request.ok and not failure.is_empty(), "", {
		"code": failure[0] if failure.size() == 2 else null,
		"message": failure[1] if failure.size() == 2 else null,
		"finished": seen["finished"].has(request_id),
		"still_connected": _client.is_ready(),
	})
	# The connection stays usable after a refused request.
	chat.adapter = str(_daemon.get("adapters", [""])[1])
	var after := await chat.wait(chat.ask("And now?"), TEXT_TIMEOUT)
	_report("chat:after_error", after.ok, after.error_message, {"text": after.text})
	chat.queue_free()


func _check_history_and_await() -> void:
	var names: Array = _daemon.get("adapters", [])
	var chat := _new_chat(names[2], 12)
	chat.system_prompt = "You are a test NPC."
	var first := await chat.wait(chat.ask("Hello there."), TEXT_TIMEOUT)
	var history_after_first := chat.history.duplicate(true)
	var next_frame := chat.build_request("Tell me more.")
	var second := await chat.wait(chat.ask("Tell me more."), TEXT_TIMEOUT)
	_report("chat:history_and_await", first.ok and second.ok,
			"%s / %s" % [first.error_message, second.error_message], {
				"history_after_first": history_after_first,
				"first_text": first.text,
				"next_roles": (next_frame["messages"] as Array).map(
					func(m: Dictionary) -> String: return m["role"]),
				"history_size_after_second": chat.history.size(),
			})
	chat.queue_free()


func _check_image() -> void:
	if not _client.welcome.get("image_model") is Dictionary:
		_report("image:generate", true, "not run: the daemon has no image model",
				{"not_run": true})
		return
	var painter := LoraloomImage.new()
	painter.width = 64
	painter.height = 64
	painter.steps = 2
	painter.random_seed = 3
	add_child(painter)
	var seen := {"progress": [], "textures": []}
	painter.image_progress.connect(func(_id: String, step: int, total: int) -> void:
		seen["progress"].append([step, total]))
	painter.image_ready.connect(func(_id: String, texture: ImageTexture) -> void:
		seen["textures"].append(texture))
	var request := await painter.wait(painter.generate("a lighthouse at dusk"), 90.0)
	var sizes: Array = (seen["textures"] as Array).map(
		func(t: ImageTexture) -> Array: return [t.get_width(), t.get_height()])
	_report("image:generate", request.ok, request.error_message, {
		"not_run": false,
		"progress": seen["progress"],
		"sizes": sizes,
		"width": request.result.get("width"),
		"height": request.result.get("height"),
	})
	painter.queue_free()


func _check_adapter_changed() -> void:
	var new_name := str(_daemon.get("new_adapter", ""))
	var events: Array = []
	var listener := func(adapter_name: String, event: String, info: Dictionary) -> void:
		events.append([adapter_name, event, info.get("status"), info.get("version")])
	_client.adapter_changed.connect(listener)
	_runner.call("request_action", "copy_adapter",
			{"source": _daemon.get("adapters", [""])[0], "target": new_name})
	var ready: bool = await _until(func() -> bool:
		return _client.get_adapter_names("text").has(new_name), 90.0)
	_client.adapter_changed.disconnect(listener)
	var mine := events.filter(func(e: Array) -> bool: return e[0] == new_name)
	_report("adapters:changed", ready and not mine.is_empty(), "events %s" % [events], {
		"events": mine,
		"listed": Array(_client.get_adapter_names("text")),
	})
	if ready:
		var chat := _new_chat(new_name, 8)
		var request := await chat.wait(chat.ask("Are you new here?"), TEXT_TIMEOUT)
		_report("adapters:new_adapter_serves", request.ok, request.error_message,
				{"adapter_versions": request.result.get("adapter_versions", {})})
		chat.queue_free()


func _check_demo() -> void:
	var scene := load("res://demo/demo.tscn") as PackedScene
	if scene == null:
		_report("demo:three_npcs", false, "the demo scene does not load")
		return
	var demo := scene.instantiate()
	var names: Array = _daemon.get("adapters", [])
	# The demo's own adapters are sample names; the test daemon has its own three.
	var npcs: Array = []
	for npc: Node in demo.get_node("NPCs").get_children():
		npcs.append(npc)
	for i in npcs.size():
		var chat := npcs[i].get_node("Chat") as LoraloomChat
		chat.adapter = names[i % names.size()]
		chat.max_tokens = 12
	add_child(demo)
	var ids: PackedStringArray = demo.call("speak_all")
	var requests: Array = []
	for i in npcs.size():
		var chat := npcs[i].get_node("Chat") as LoraloomChat
		requests.append(await chat.wait(ids[i], TEXT_TIMEOUT))
	var outcome: Array = requests.map(func(r: LoraloomRequest) -> Array:
		return [r.ok, r.error_code, r.result.get("adapter_versions", {}).keys()])
	_report("demo:three_npcs", npcs.size() == 3 and requests.all(
			func(r: LoraloomRequest) -> bool: return r.ok), "%s" % [outcome],
			{"npcs": npcs.size(), "outcome": outcome})
	demo.queue_free()


func _check_bad_token() -> void:
	var other := LoraloomClient.new()
	add_child(other)
	other.auto_reconnect = false
	var failures: Array = []
	other.connection_failed.connect(func(reason: String) -> void: failures.append(reason))
	other.connect_to_daemon(str(_daemon.get("url")), "not-the-token")
	var refused: bool = await _until(func() -> bool: return not failures.is_empty(), 20.0)
	_report("client:bad_token", refused and not other.is_ready(), "%s" % [failures],
			{"reason": failures[0] if refused else null})
	other.queue_free()


func _check_reconnect() -> void:
	var drops: Array = []
	_client.disconnected.connect(func(code: int, _reason: String) -> void: drops.append(code))
	_client.disconnect_from_daemon()
	var down := not _client.is_ready()
	_client.connect_to_daemon()
	var up: bool = await _until(func() -> bool: return _client.is_ready(), 30.0)
	var pong := await _client.ping().wait(10.0)
	_report("client:reconnect", down and up and pong.ok, pong.error_message,
			{"disconnected_signals": drops.size()})
