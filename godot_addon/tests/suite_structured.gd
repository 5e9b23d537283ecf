extends "res://tests/suite_base.gd"
## Structured replies against the real daemon: JSON Schemas (await and signal forms), choices,
## regexes, a grammar, tool calls, constrained and free lines on several adapters at once, a reply
## cut short, a refused constraint, and the structured demo (the guard's action, the quest).
##
## The schemas, patterns and tool come from pytest's configuration (JSON: every number arrives as
## a float, as in a game that loads its schemas from a file), and pytest validates what comes
## back with jsonschema and re. Runs after suite_daemon.gd, on the autoload it left connected.

const TEXT_TIMEOUT := 120.0

var _daemon: Dictionary
var _config: Dictionary
var _client: LoraloomClient


## Runs the suite, reporting through [param runner].
func run(runner: Node) -> void:
	_runner = runner
	_daemon = runner.get("config").get("daemon", {})
	_config = runner.get("config").get("structured", {})
	_client = get_node_or_null("/root/Loraloom") as LoraloomClient
	if _daemon.is_empty() or _config.is_empty() or _client == null:
		_report("structured:configured", false, "no daemon, configuration or autoload")
		return
	if not await _until(func() -> bool: return _client.is_ready(), 30.0):
		_report("structured:configured", false, "the autoload is not connected")
		return
	await _check_json()
	await _check_choices_regex_grammar()
	await _check_tools()
	await _check_mixed_batch()
	await _check_incomplete()
	await _check_bad_constraint()
	await _check_demo()


func _adapter(index: int) -> String:
	var names: Array = _daemon.get("adapters", [])
	return str(names[index % names.size()])


func _new_chat(adapter: String, max_tokens: int, random_seed: int) -> LoraloomChat:
	var chat := LoraloomChat.new()
	chat.adapter = adapter
	chat.max_tokens = max_tokens
	chat.temperature = 0.9
	chat.random_seed = random_seed
	chat.answer_timeout = TEXT_TIMEOUT
	add_child(chat)
	return chat


## Records a chat node's signals, in order.
func _record(chat: LoraloomChat) -> Dictionary:
	var seen := {"order": [], "json": [], "calls": [], "finished": [], "failed": []}
	chat.json_received.connect(func(value: Variant) -> void:
		seen["json"].append(value)
		seen["order"].append("json"))
	chat.tool_called.connect(func(tool_name: String, arguments: Dictionary) -> void:
		seen["calls"].append({"name": tool_name, "arguments": arguments})
		seen["order"].append("tool"))
	chat.response_finished.connect(func(text: String) -> void:
		seen["finished"].append(text)
		seen["order"].append("finished"))
	chat.request_failed.connect(func(code: String, message: String) -> void:
		seen["failed"].append([code, message])
		seen["order"].append("failed"))
	return seen


func _check_json() -> void:
	var outcomes: Array = []
	var schemas: Array = _config.get("schemas", [])
	for i in schemas.size():
		var chat := _new_chat(_adapter(i), 200, 11 + i)
		var seen := _record(chat)
		var schema: Dictionary = schemas[i]
		# The await form for objects; the signal form (and the request) for every schema.
		var value: Variant = null
		if str(schema.get("type", "")) == "object":
			value = await chat.ask_json("Line %d: the guard reports." % i, schema)
		else:
			var request := chat.ask_request("Line %d: the guard reports." % i, {"json_schema": schema})
			await request.wait(TEXT_TIMEOUT)
			value = request.json
		outcomes.append({
			"value": value,
			"signals": seen["json"],
			"order": seen["order"],
			"text": seen["finished"][0] if seen["finished"].size() == 1 else null,
			"failed": seen["failed"],
			"sent_schema_types": _types(chat.build_request("x", {"json_schema": schema})["json_schema"]),
			"history": chat.history,
		})
		chat.queue_free()
	var ok := outcomes.all(func(o: Dictionary) -> bool: return o["failed"].is_empty())
	_report("structured:json", ok and not outcomes.is_empty(), "", {"outcomes": outcomes})


## The Variant types of a value's numbers, by key path (whole floats must go out as ints).
func _types(value: Variant, path: String = "") -> Dictionary:
	var found := {}
	if value is Dictionary:
		for key: Variant in value:
			found.merge(_types(value[key], "%s/%s" % [path, key]))
	elif value is Array:
		for i in (value as Array).size():
			found.merge(_types(value[i], "%s/%d" % [path, i]))
	elif typeof(value) in [TYPE_INT, TYPE_FLOAT]:
		found[path] = "int" if typeof(value) == TYPE_INT else "float"
	return found


func _check_choices_regex_grammar() -> void:
	var picked: Array = []
	var choices: Array = _config.get("choices", [])
	for i in 6:
		var chat := _new_chat(_adapter(i), 24, 30 + i)
		picked.append(await chat.ask_choice("A wolf runs at you (%d)." % i,
				PackedStringArray(choices)))
		chat.queue_free()
	_report("structured:choices", not picked.has(""), "", {"picked": picked, "choices": choices})
	var matched: Array = []
	for pattern: String in _config.get("regexes", []):
		var chat := _new_chat(_adapter(matched.size()), 40, 40 + matched.size())
		matched.append([pattern, await chat.ask_regex("What time is it?", pattern)])
		chat.queue_free()
	_report("structured:regex", matched.all(func(m: Array) -> bool: return not m[1].is_empty()),
			"", {"matched": matched})
	var grammar := str(_config.get("grammar", ""))
	var said: Array = []
	for i in 3:
		var chat := _new_chat(_adapter(i), 24, 50 + i)
		said.append(await chat.ask_grammar("Will you help?", grammar))
		chat.queue_free()
	_report("structured:grammar", not said.has(""), "", {"said": said, "grammar": grammar})


func _check_tools() -> void:
	var tool: Dictionary = _config.get("tool", {})
	var chat := _new_chat(_adapter(0), 60, 60)
	chat.temperature = 0.0
	# The tool's definition fills most of the 256-token context: each line goes out alone.
	chat.keep_history = false
	var seen := _record(chat)
	chat.tools = [tool]
	chat.tool_choice = "required"
	var calls := await chat.ask_tool_calls("Open up, guard.")
	var required_order: Array = seen["order"].duplicate()
	# A plain ask() on a node with tools sends them too; a named choice forces that tool.
	chat.tool_choice = str(tool.get("name", ""))
	var frame := chat.build_request("Open the gate.")
	var reply := await chat.ask("Open the gate.")
	# tool_choice none: the tools are not shown, the reply is words.
	var words := await chat.ask_tool_calls("Just talk.", [tool], "none")
	_report("structured:tools", seen["failed"].is_empty() and calls.size() == 1,
			"%s" % [seen["failed"]], {
				"calls": calls,
				"signalled": seen["calls"],
				"required_order": required_order,
				"ask_reply": reply,
				"sent_tools": frame.get("tools"),
				"sent_tool_choice": frame.get("tool_choice"),
				"none_calls": words,
			})
	chat.queue_free()


func _check_mixed_batch() -> void:
	# Constrained and free lines on different adapters, all in flight at once.
	var schemas: Array = _config.get("schemas", [])
	var lines: Array = []
	var chats: Array = []
	for i in 8:
		var chat := _new_chat(_adapter(i), 120, 70 + i)
		chats.append(chat)
		var kind: String = ["json_schema", "choices", "regex", "free"][i % 4]
		var constraint := {}
		match kind:
			"json_schema":
				constraint = {"json_schema": schemas[i % schemas.size()]}
			"choices":
				constraint = {"choices": _config.get("choices", [])}
			"regex":
				constraint = {"regex": _config.get("regexes", [""])[0]}
		if kind == "free":
			chat.max_tokens = 12
		lines.append({"kind": kind, "constraint": constraint,
				"request": chat.ask_request("Mixed line %d." % i, constraint)})
	var together := chats.all(func(c: LoraloomChat) -> bool: return c.is_busy())
	var outcomes: Array = []
	for line: Dictionary in lines:
		var request: LoraloomRequest = await (line["request"] as LoraloomRequest).wait(TEXT_TIMEOUT)
		outcomes.append({"kind": line["kind"], "ok": request.ok, "error": request.error_message,
				"text": request.text, "json": request.json, "constraint": request.constraint,
				"adapters": request.result.get("adapter_versions", {}).keys(),
				"index": outcomes.size()})
	_report("structured:mixed_batch", outcomes.all(func(o: Dictionary) -> bool: return o["ok"]),
			"", {"outcomes": outcomes, "in_flight_together": together})
	for chat: LoraloomChat in chats:
		chat.queue_free()


func _check_incomplete() -> void:
	var chat := _new_chat(_adapter(1), 3, 80)
	var seen := _record(chat)
	var value := await chat.ask_json("A quest, quick.", _config.get("schemas", [{}])[1])
	var request := chat.ask_request("Again.", {"choices": ["a very long answer indeed"]})
	await request.wait(TEXT_TIMEOUT)
	_report("structured:incomplete", value.is_empty() and seen["failed"].size() == 2, "", {
		"failed": seen["failed"],
		"json_signals": seen["json"].size(),
		"history": chat.history,
		"request_error": request.error_code,
		"request_constraint": request.constraint,
		"kept_text": request.text,
	})
	chat.queue_free()


func _check_bad_constraint() -> void:
	var chat := _new_chat(_adapter(2), 24, 90)
	var seen := _record(chat)
	var bad := await chat.ask_regex("Hmm?", "[a-")
	var after := await chat.ask_choice("And now?", PackedStringArray(["yes", "no"]))
	_report("structured:bad_constraint", bad.is_empty() and after in ["yes", "no"], "", {
		"failed": seen["failed"],
		"after": after,
		"still_connected": _client.is_ready(),
	})
	chat.queue_free()


func _check_demo() -> void:
	var scene := load("res://demo/structured.tscn") as PackedScene
	if scene == null:
		_report("demo:structured", false, "the structured demo scene does not load")
		return
	var demo := scene.instantiate()
	add_child(demo)
	var guard := demo.get_node("Guard")
	var giver := demo.get_node("QuestGiver")
	# The demo's adapters are sample names; the test daemon has its own.
	(guard.call("get_chat") as LoraloomChat).adapter = _adapter(0)
	(giver.call("get_chat") as LoraloomChat).adapter = _adapter(1)
	(guard.call("get_chat") as LoraloomChat).random_seed = 5
	(giver.call("get_chat") as LoraloomChat).random_seed = 6
	var acted: Array = []
	guard.connect("acted", func(action: String) -> void: acted.append(action))
	var offered: Array = []
	giver.connect("quest_offered", func(quest: Dictionary) -> void: offered.append(quest))
	var actions: Array = []
	for event: String in ["A stranger offers gold.", "Wolves at the gate!"]:
		actions.append(await guard.call("react", event))
	var quest: Dictionary = await giver.call("offer_quest", "Ayla")
	_report("demo:structured", not actions.has("") and not quest.is_empty(), "", {
		"actions": actions,
		"acted": acted,
		"known_actions": (_constant(guard, "ACTIONS") as Dictionary).keys(),
		"outcome": guard.get("last_outcome"),
		"quest": quest,
		"offered": offered,
		"quest_schema": _constant(giver, "QUEST_SCHEMA"),
	})
	demo.queue_free()


func _constant(node: Node, constant_name: String) -> Variant:
	return (node.get_script() as Script).get_script_constant_map().get(constant_name)
