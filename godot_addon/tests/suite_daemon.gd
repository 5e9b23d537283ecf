extends "res://tests/suite_base.gd"
## The addon against a real daemon: connecting through the runtime file, streaming chats on
## several adapters at once, stop, errors, history, images, live adapter changes and the demo.
##
## pytest starts the daemon (tiny random model: the text is gibberish, so only structure is
## checked) and passes its address, token and adapter names in the configuration.

const TEXT_TIMEOUT := 120.0
const PERSONA := "You are Salty Meg, the quartermaster."
const TURNS := 200

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
	await _check_long_conversation()
	await _check_save_and_restore()
	await _check_concurrent_asks()
	await _check_image()
	await _check_adapter_changed()
	await _check_demo()
	await _check_bad_token()
	await _check_reconnect()


func _new_chat(adapter: String, max_tokens: int) -> LoraloomChat:
	var chat := LoraloomChat.new()
	chat.adapter = adapter
	chat.max_tokens = max_tokens
	chat.temperature = 0.9
	add_child(chat)
	return chat


## Records one chat node's signals, in order, into a dictionary the checks read.
func _record(chat: LoraloomChat) -> Dictionary:
	var seen := {"tokens": [], "finished": [], "failed": [], "order": []}
	chat.response_updated.connect(func(chunk: String) -> void:
		seen["tokens"].append(chunk)
		seen["order"].append("updated"))
	chat.response_finished.connect(func(text: String) -> void:
		seen["finished"].append(text)
		seen["order"].append("finished"))
	chat.request_failed.connect(func(code: String, message: String) -> void:
		seen["failed"].append([code, message])
		seen["order"].append("failed"))
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
	var id_first := first.ask_request("Ahoy! Who goes there?").id
	var id_second := second.ask_request("Hello, traveller.").id
	var in_flight_together := first.is_busy() and second.is_busy()
	var done_first := await first.wait(id_first, TEXT_TIMEOUT)
	var done_second := await second.wait(id_second, TEXT_TIMEOUT)
	var data := {"in_flight_together": in_flight_together, "ids": [id_first, id_second]}
	for entry: Array in [[done_first, seen_first, names[0]], [done_second, seen_second, names[1]]]:
		var request: LoraloomRequest = entry[0]
		var seen: Dictionary = entry[1]
		var tokens := PackedStringArray(seen["tokens"])
		data[entry[2]] = {
			"ok": request.ok,
			"error": request.error_code,
			"chunks": tokens.size(),
			"joined_tokens": "".join(tokens),
			"finished_text": seen["finished"][0] if seen["finished"].size() == 1 else null,
			"order": seen["order"],
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
	var story := "Tell me a very long story about the sea, part %d." % attempt
	var request_id := chat.ask_request(story).id
	var streaming: bool = await _until(func() -> bool: return not seen["tokens"].is_empty(), 60.0)
	chat.stop_generation()
	var request := await chat.wait(request_id, 30.0)
	var tokens := PackedStringArray(seen["tokens"])
	var history := chat.history
	chat.queue_free()
	return {
		"ok": request.ok,
		"error": request.error_message,
		"streaming": streaming,
		"finish_reason": request.finish_reason,
		"chunks": tokens.size(),
		"joined_tokens": "".join(tokens),
		"finished_text": seen["finished"][0] if seen["finished"].size() == 1 else null,
		"history": history,
		"completion_tokens": request.result.get("completion_tokens"),
		"max_tokens": chat.max_tokens,
	}


func _check_unknown_adapter() -> void:
	var chat := _new_chat(str(_daemon.get("unknown_adapter", "ghost")), 8)
	var seen := _record(chat)
	var reply := await chat.ask("Anyone there?")
	var failure: Array = seen["failed"][0] if seen["failed"].size() == 1 else []
	_report("chat:unknown_adapter", reply.is_empty() and not failure.is_empty(), "", {
		"code": failure[0] if failure.size() == 2 else null,
		"message": failure[1] if failure.size() == 2 else null,
		"finished": not seen["finished"].is_empty(),
		"history": chat.history,
		"still_connected": _client.is_ready(),
	})
	# The connection stays usable after a refused request.
	chat.adapter = str(_daemon.get("adapters", [""])[1])
	var after := await chat.ask_request("And now?").wait(TEXT_TIMEOUT)
	_report("chat:after_error", after.ok, after.error_message, {"text": after.text})
	chat.queue_free()


func _check_history_and_await() -> void:
	var names: Array = _daemon.get("adapters", [])
	var chat := _new_chat(names[2], 12)
	chat.system_prompt = "You are a test NPC."
	var seen := _record(chat)
	# The await form yields the reply's text.
	var first_text := await chat.ask("Hello there.")
	var history_after_first := chat.history
	var next_frame := chat.build_request("Tell me more.")
	var second := await chat.ask_request("Tell me more.").wait(TEXT_TIMEOUT)
	_report("chat:history_and_await", seen["failed"].is_empty() and second.ok,
			"%s / %s" % [seen["failed"], second.error_message], {
				"history_after_first": history_after_first,
				"first_text": first_text,
				"finished": seen["finished"],
				"next_roles": (next_frame["messages"] as Array).map(
					func(m: Dictionary) -> String: return m["role"]),
				"next_trim_history": next_frame.get("trim_history"),
				"next_priority": next_frame.get("priority"),
				"history_size_after_second": chat.history.size(),
			})
	chat.queue_free()


func _check_long_conversation() -> void:
	var chat := _new_chat(str(_daemon.get("adapters", [""])[0]), 16)
	chat.temperature = 0.0
	chat.system_prompt = PERSONA
	var model: Variant = _client.welcome.get("text_model")
	var context := int(model.get("context_length", 0)) if model is Dictionary else 0
	var problems := []
	var drops := []
	for turn in TURNS:
		var line := "Turn %d: where is the rum hidden?" % turn
		var request := await chat.ask_request(line).wait(TEXT_TIMEOUT)
		if not request.ok:
			problems.append([turn, request.error_code, request.error_message])
			break
		drops.append(int(request.result.get("dropped_messages", 0)))
		if int(request.result.get("prompt_tokens", 0)) + 16 > context:
			problems.append([turn, "prompt", request.result.get("prompt_tokens")])
		var history := chat.history
		if history.size() < 2 or history[-2]["content"] != line or history[-1]["content"] != request.text:
			problems.append([turn, "not recorded", history.slice(-2)])
		for i in history.size():
			if history[i]["role"] != ["user", "assistant"][i % 2]:
				problems.append([turn, "roles", history.map(func(m: Dictionary) -> String:
					return m["role"])])
				break
		if problems.size() > 3:
			break
	var first_message: Dictionary = chat.build_request("next")["messages"][0]
	_report("chat:200_turns", problems.is_empty() and drops.size() == TURNS, "%s" % [problems], {
		"answered": drops.size(),
		"drops": drops,
		"context": context,
		"first_message": first_message,
		"history_size": chat.history.size(),
	})
	chat.queue_free()


func _check_save_and_restore() -> void:
	var names: Array = _daemon.get("adapters", [])
	var first := _new_chat(names[1], 8)
	first.random_seed = 3
	first.system_prompt = PERSONA
	# Quotes, a new line, non-ASCII and a control character (which JSON must escape).
	var lines := ["Ahoy!", "Any rum \"left\"?\nSay it.", "Où? ✓ \u0007"]
	for line: String in lines:
		await first.ask(line)
	var saved := first.save_conversation()
	var restored := _new_chat(names[1], 8)
	restored.random_seed = 3
	var loaded := restored.load_conversation(saved)
	var loaded_history := restored.history
	var same_frames: bool = restored.build_request("And then?") == first.build_request("And then?")
	var again := await restored.ask("And then?")
	var original := await first.ask("And then?")
	var before := restored.save_conversation()
	var refused := []
	for bad: String in ['{"history": [{"role": "narrator", "content": "x"}]}',
			'{"system_prompt": 3, "history": []}', "[1, 2]", '{"system_prompt": "x"}', "not json"]:
		refused.append(restored.load_conversation(bad) != OK)
	var unchanged := restored.save_conversation() == before
	var python := _new_chat(names[1], 8)
	var python_loaded := python.load_conversation(str(_daemon.get("python_conversation", "")))
	var python_history := python.history
	# Writable: a history assigned from game code (a system note first) goes out as given.
	python.history = [{"role": "system", "content": "The player is a ghost."},
			{"role": "user", "content": "boo"}, {"role": "assistant", "content": "eek"}]
	var assigned_roles: Array = (python.build_request("again")["messages"] as Array).map(
			func(m: Dictionary) -> String: return m["role"])
	_report("chat:save_and_restore", loaded == OK and python_loaded == OK, "", {
		"saved": saved,
		"lines": lines,
		"restored_history": loaded_history,
		"restored_persona": restored.system_prompt,
		"same_frames": same_frames,
		"again": again,
		"original": original,
		"refused": refused,
		"unchanged": unchanged,
		"python_history": python_history,
		"python_persona": python.system_prompt,
		"assigned_roles": assigned_roles,
	})
	for chat: LoraloomChat in [first, restored, python]:
		chat.queue_free()


func _check_concurrent_asks() -> void:
	var chat := _new_chat(str(_daemon.get("adapters", [""])[2]), 12)
	chat.system_prompt = PERSONA
	chat.temperature = 0.9
	var seen := _record(chat)
	var requests: Array[LoraloomRequest] = []
	for line: String in ["one", "two", "three"]:
		requests.append(chat.ask_request(line))
	var busy := chat.is_busy()
	for request: LoraloomRequest in requests:
		await request.wait(TEXT_TIMEOUT)
	_report("chat:concurrent_asks", requests.all(func(r: LoraloomRequest) -> bool: return r.ok),
			"%s" % [requests.map(func(r: LoraloomRequest) -> String: return r.error_message)], {
				"busy": busy,
				"history": chat.history,
				"texts": requests.map(func(r: LoraloomRequest) -> String: return r.text),
				"prompt_tokens": requests.map(func(r: LoraloomRequest) -> int:
					return int(r.result.get("prompt_tokens", 0))),
				"finished": seen["finished"],
				"order": seen["order"],
				"chunks": requests.map(func(r: LoraloomRequest) -> int: return r.chunk_count),
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
		var request := await chat.ask_request("Are you new here?").wait(TEXT_TIMEOUT)
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
	var again: Array = []
	_client.disconnected.connect(func(code: int, _reason: String) -> void: drops.append(code))
	_client.reconnected.connect(func(_welcome: Dictionary) -> void: again.append(true))
	_client.disconnect_from_daemon()
	var down := not _client.is_ready()
	_client.connect_to_daemon()
	var up: bool = await _until(func() -> bool: return _client.is_ready(), 30.0)
	var pong := await _client.ping().wait(10.0)
	_report("client:reconnect", down and up and pong.ok, pong.error_message,
			{"disconnected_signals": drops.size(), "reconnected_signals": again.size()})
