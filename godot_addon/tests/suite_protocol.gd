extends Node
## The generated schema (LoraloomProtocol) and what the addon builds and checks with it
## (LoraloomFrames), against what pytest read from the Python models: constants, canonical frames
## with defaults filled in, the same verdicts as the models on valid and invalid frames, and the
## nodes' defaults and frames.

const Codec := preload("res://tests/suite_codec.gd")
const FIXTURES := "res://tests/fixtures/"
# A subscript of a schema constant is itself a constant, written as chat.gd and image.gd write
# their exported defaults (the editor's inspector shows only constant initialisers). These lines
# fail to compile otherwise.
const _DEFAULTS := LoraloomProtocol.GENERATE_DEFAULTS
const _TEMPERATURE: float = _DEFAULTS["temperature"]


## Runs the suite, reporting through [param runner].
func run(runner: Node) -> void:
	var config: Dictionary = runner.get("config").get("protocol", {})
	if config.is_empty():
		runner.call("report", "protocol:configured", false, "pytest gave no protocol facts")
		return
	_check_constants(runner, config.get("facts", {}))
	_check_build(runner, config.get("build_cases", []))
	_check_verdicts(runner, config.get("check_cases", []))
	await _check_nodes(runner)
	_check_conversation_rules(runner)


func _check_constants(runner: Node, facts: Dictionary) -> void:
	var problems := PackedStringArray()
	if LoraloomProtocol.VERSION != int(facts.get("version", -1)):
		problems.append("VERSION %d" % LoraloomProtocol.VERSION)
	if LoraloomProtocol.CLIENT_TYPES != facts.get("client_types"):
		problems.append("CLIENT_TYPES %s" % [LoraloomProtocol.CLIENT_TYPES])
	if LoraloomProtocol.SERVER_TYPES != facts.get("server_types"):
		problems.append("SERVER_TYPES %s" % [LoraloomProtocol.SERVER_TYPES])
	var meanings: Dictionary = facts.get("errors", {})
	if not Codec.same_value(LoraloomProtocol.ERROR_MEANINGS, meanings):
		problems.append("ERROR_MEANINGS differ")
	if LoraloomProtocol.CLIENT_ONLY_ERRORS != facts.get("client_only"):
		problems.append("CLIENT_ONLY_ERRORS %s" % [LoraloomProtocol.CLIENT_ONLY_ERRORS])
	var types: Array = LoraloomProtocol.MESSAGES.keys()
	if types != LoraloomProtocol.CLIENT_TYPES + LoraloomProtocol.SERVER_TYPES:
		problems.append("MESSAGES has %s" % [types])
	if _TEMPERATURE != LoraloomProtocol.GENERATE_FIELDS["temperature"]["default"]:
		problems.append("GENERATE_DEFAULTS disagrees with GENERATE_FIELDS")
	runner.call("report", "protocol:constants", problems.is_empty(), "; ".join(problems),
			{"errors": LoraloomProtocol.ERROR_MEANINGS.size()})


func _check_build(runner: Node, cases: Array) -> void:
	# Only the fields that differ from their defaults go in; build() must give the golden bytes.
	var codec := LoraloomMsgpack.new()
	var problems := PackedStringArray()
	for case: Variant in cases:
		var name := str(case["name"])
		var golden := FileAccess.get_file_as_bytes(FIXTURES + name + ".msgpack")
		var fields: Dictionary = Codec.from_typed(case["fields"])
		var frame := LoraloomFrames.build(str(case["type"]), fields)
		var bytes := codec.encode(frame)
		if bytes != golden:
			problems.append("%s: built %s" % [name, Codec.describe(frame)])
		var verdict := LoraloomFrames.check(codec.decode(golden))
		if not verdict.is_empty():
			problems.append("%s: the golden frame is refused: %s" % [name, verdict])
	runner.call("report", "protocol:build", problems.is_empty() and not cases.is_empty(),
			"; ".join(problems), {"cases": cases.size()})


func _check_verdicts(runner: Node, cases: Array) -> void:
	var disagreements := []
	for case: Variant in cases:
		var verdict := LoraloomFrames.check(Codec.from_typed(case["frame"]))
		if verdict.is_empty() != bool(case["valid"]):
			disagreements.append([case["name"], case["valid"], verdict])
	runner.call("report", "protocol:check", disagreements.is_empty() and not cases.is_empty(),
			"disagree with the models: %s" % [disagreements], {"cases": cases.size()})


func _check_nodes(runner: Node) -> void:
	var problems := PackedStringArray()
	var chat := LoraloomChat.new()
	chat.adapter = "pirate"
	chat.random_seed = 7
	var defaults := LoraloomProtocol.GENERATE_DEFAULTS
	for key: String in ["temperature", "top_k", "top_p", "repetition_penalty"]:
		if chat.get(key) != defaults[key]:
			problems.append("chat.%s is %s, not %s" % [key, chat.get(key), defaults[key]])
	var asked := chat.build_request("Ahoy")
	if asked.keys().slice(0, 3) != ["type", "adapters", "messages"]:
		problems.append("chat frame keys %s" % [asked.keys()])
	asked["id"] = "c-1"
	var verdict := LoraloomFrames.check(asked)
	if not verdict.is_empty():
		problems.append("chat frame: " + verdict)
	var image := LoraloomImage.new()
	for key: String in ["width", "height", "steps", "guidance", "count"]:
		if image.get(key) != LoraloomProtocol.GENERATE_IMAGE_DEFAULTS[key]:
			problems.append("image.%s is %s" % [key, image.get(key)])
	var painted := image.build_request("a lighthouse")
	painted["id"] = "i-1"
	verdict = LoraloomFrames.check(painted)
	if not verdict.is_empty():
		problems.append("image frame: " + verdict)
	chat.free()
	image.free()
	# A frame the daemon would refuse fails on the client, with the daemon's code.
	var client := LoraloomClient.new()
	var refused := client.send_request(
			{"type": LoraloomProtocol.GENERATE, "prompt": "hi", "temperature": 9.0})
	await refused.wait(5.0)
	if refused.error_code != LoraloomProtocol.ERROR_BAD_MESSAGE:
		problems.append("invalid request ended with %s" % refused.error_code)
	client.free()
	runner.call("report", "protocol:nodes", problems.is_empty(), "; ".join(problems),
			{"refused": refused.error_message})


## LoraloomConversation's bookkeeping without a daemon: what it sends, what it forgets after the
## daemon dropped messages, whole-turn caps, and what it does not record.
func _check_conversation_rules(runner: Node) -> void:
	var talk := LoraloomConversation.new()
	talk.system_prompt = "You are Meg."
	# A save that starts with a system note and a stray assistant message.
	talk.history = [{"role": "system", "content": "The player is a ghost."},
			{"role": "assistant", "content": "Who's there?"}, {"role": "user", "content": "boo"},
			{"role": "assistant", "content": "eek"}, {"role": "narrator", "content": "left out"}]
	var roles := func(messages: Array) -> Array:
		return messages.map(func(m: Dictionary) -> String: return m["role"])
	var data := {"sent": roles.call(talk.build_messages("hi")), "kept": talk.history.size()}
	var generation := talk.generation
	# The daemon left out 2 messages after the system ones: the stray reply and "boo".
	talk.record("again", "aye", "stop", 2, generation)
	data["after_drop"] = talk.history.map(func(m: Dictionary) -> String: return m["content"])
	talk.record("stopped", "", "cancelled", 0, generation)
	talk.record("late", "nope", "stop", 0, generation - 1)
	data["unrecorded"] = talk.history.size()
	talk.max_history_turns = 1
	talk.record("last", "yes", "length", 0, generation)
	data["capped"] = talk.history.map(func(m: Dictionary) -> String: return m["content"])
	talk.keep_history = false
	data["without_history"] = roles.call(talk.build_messages("hi"))
	var expected := {
		"sent": ["system", "system", "assistant", "user", "assistant", "user"],
		"kept": 4,
		"after_drop": ["The player is a ghost.", "eek", "again", "aye"],
		"unrecorded": 4,
		"capped": ["The player is a ghost.", "last", "yes"],
		"without_history": ["system", "user"],
	}
	var problems := PackedStringArray()
	for key: String in expected:
		if data[key] != expected[key]:
			problems.append("%s: %s, not %s" % [key, data[key], expected[key]])
	runner.call("report", "conversation:rules", problems.is_empty(), "; ".join(problems), data)
