class_name LoraloomChat
extends LoraloomRequester
## One conversation with the daemon's text model through one adapter: an NPC's voice.
##
## Many chat nodes share the one connection (the autoload [code]Loraloom[/code]) and the one base
## model; each line names this node's adapter, so NPCs on different adapters are batched together
## by the daemon.
## [codeblock]
## @onready var npc: LoraloomChat = $Pirate
##
## func _ready() -> void:
##     npc.response_updated.connect(func(chunk: String) -> void: label.text += chunk)
##     var reply := await npc.ask("Who goes there?")   # "" when it failed: see request_failed
## [/codeblock]
## [b]History[/b]: the node keeps a [LoraloomConversation] ([member conversation]). Each line goes
## out with the persona ([member system_prompt]), the whole history and
## [code]trim_history[/code]; when they do not fit the context with room for the reply, the
## daemon leaves out the oldest whole turns (counted in its real tokens, down to 3/4 of its budget
## so the following lines keep their cached prefix) and the node forgets the same ones. So a long
## conversation never stops with [code]prompt_too_long[/code]; only a persona plus a line that
## alone do not fit do.[br]
## [b]Order[/b]: lines asked while one is being answered wait, and go out one at a time in the
## order they were asked, each with the exchanges before it. So the signals carry no request id:
## they are about the line being answered.[br]
## [b]Bounds[/b]: every line ends. It waits for the connection up to the client's
## [member LoraloomClient.request_connect_wait] and, once sent, for its answer up to
## [member answer_timeout]; then it fails ([code]not_connected[/code], [code]timeout[/code]).[br]
## [b]Structured replies[/b] (the daemon constrains the tokens, so the reply is always valid):
## [method ask_json] (a JSON Schema; the parsed [Dictionary]), [method ask_choice] (one of the
## game's actions), [method ask_regex], [method ask_grammar]; and [member tools] (functions the
## NPC may call) with [signal tool_called] and [method ask_tool_calls]. A constrained line waits
## its turn and is recorded in the history like any other (its text is the JSON, the choice or
## the call). One that ended before its output matched fails with
## [constant LoraloomRequest.ERROR_INCOMPLETE] ([code]incomplete[/code]).
## [codeblock]
## var action := await npc.ask_choice("A wolf!", PackedStringArray(["attack", "flee", "talk"]))
## var quest := await giver.ask_json("A quest, please.", QUEST_SCHEMA)   # {} when it failed
## [/codeblock]

## Emitted for every piece of text of the line being answered, as it arrives. [param chunk] is
## the new text only.
signal response_updated(chunk: String)
## Emitted when a line was answered; [param text] is the whole reply (also after
## [method stop_generation], with what was generated until then).
signal response_finished(text: String)
## Emitted when a line failed: [param code] is the protocol's error code (for example
## [code]unknown_adapter[/code]) or a client-side one ([code]not_connected[/code],
## [code]connection_closed[/code], [code]timeout[/code]); [param message] says why.
signal request_failed(code: String, message: String)
## Emitted, before [signal response_finished], for a line asked with a JSON Schema: the reply
## parsed ([Dictionary] for an object schema, [Array], String, number or bool for others).
signal json_received(value: Variant)
## Emitted, before [signal response_finished], for the call the model made with [member tools]:
## the tool's name and its arguments (valid against its [code]parameters[/code] schema).
signal tool_called(tool_name: String, arguments: Dictionary)

## The keys of a constraint (see [method ask_request]).
const CONSTRAINTS := ["json_schema", "regex", "choices", "grammar", "tools"]

# The protocol's defaults, as constants so that the inspector shows them.
const _DEFAULTS := LoraloomProtocol.GENERATE_DEFAULTS
const _ADAPTER_DEFAULTS := LoraloomProtocol.ADAPTER_REF_DEFAULTS

## The adapter that gives this node its voice (a folder name in the daemon's adapter folder);
## empty uses the base model.
@export var adapter: String = ""
## How strongly the adapter applies: 1 as trained, 0 none, negative values push away from it.
@export_range(-8.0, 8.0, 0.05) var adapter_scale: float = _ADAPTER_DEFAULTS["scale"]
## The persona, sent first with every line and never trimmed; empty sends none.
@export_multiline var system_prompt: String = ""
## Remember the exchanges and send them with each new line.
@export var keep_history: bool = true
## The most turns kept (a question and its answer); 0 keeps what the daemon's context holds.
@export_range(0, 256) var max_history_turns: int = 0

@export_group("Sampling")
## The most tokens one answer may have (an NPC's line: fewer than the protocol's default).
@export_range(1, 8192) var max_tokens: int = 128
## Randomness: 0 always picks the likeliest token.
@export_range(0.0, 5.0, 0.01) var temperature: float = _DEFAULTS["temperature"]
## Sample only among the k likeliest tokens; 0 turns it off.
@export_range(0, 1000) var top_k: int = _DEFAULTS["top_k"]
## Sample only among the likeliest tokens whose probabilities add up to p; 1 turns it off.
@export_range(0.01, 1.0, 0.01) var top_p: float = _DEFAULTS["top_p"]
## Above 1 makes repeating earlier tokens less likely.
@export_range(0.05, 5.0, 0.01) var repetition_penalty: float = _DEFAULTS["repetition_penalty"]
## Seed for repeatable answers; -1 picks a new one each time.
@export var random_seed: int = -1
## Texts that end an answer when generated (not included in it).
@export var stop_sequences: PackedStringArray = PackedStringArray()
## Player lines are scheduled first, background chatter last (and may be paused for others).
@export_enum("player", "normal", "background") var priority: String = _DEFAULTS["priority"]
## Seconds a line may take once sent before it fails with [code]timeout[/code].
@export_range(1.0, 600.0, 1.0) var answer_timeout: float = 120.0

@export_group("Tools")
## Functions this NPC may call (the game's actions), each
## [code]{"name": ..., "description": ..., "parameters": {JSON Schema}}[/code]; sent with every
## line that has no other constraint. A call emits [signal tool_called]. Empty: none.
@export var tools: Array[Dictionary] = []
## With [member tools]: [code]auto[/code] (text or one call), [code]required[/code] (one call),
## [code]none[/code] (text; the tools are not shown) or a tool's name (a call of that tool).
@export var tool_choice: String = _DEFAULTS["tool_choice"]

## The persona and the turns; [member system_prompt], [member keep_history] and
## [member max_history_turns] are copied into it before each line.
var conversation := LoraloomConversation.new()
## The turns so far, oldest first ([code]{"role": ..., "content": ...}[/code]). Reading gives a
## copy; assign to replace them (a line still being answered is then not recorded).
var history: Array:
	get:
		return conversation.history
	set(value):
		conversation.history = value

var _waiting: Array[Dictionary] = []
var _current: Dictionary = {}
var _closing: bool = false


func _notification(what: int) -> void:
	if what == NOTIFICATION_PREDELETE:
		_abandon_lines()


## Says [param text] as the player's next line and returns the reply, or an empty string when the
## line failed ([signal request_failed] says why). Await it, or call it without
## [code]await[/code] and use the signals. The reply streams through [signal response_updated]
## and ends with [signal response_finished].
func ask(text: String) -> String:
	var request := ask_request(text)
	if not request.done:
		# Bounded: every line ends (answer, failure, answer_timeout, or this node being freed).
		await request.finished
	return request.text if request.ok else ""


## [method ask] as a [LoraloomRequest], for code that wants its id, finish reason or result:
## [code]var line := chat.ask_request("Hi"); await line.wait()[/code]. Failures, even
## immediate ones, arrive after this returns. [param constraint] holds at most one of
## [code]json_schema[/code] (a [Dictionary]), [code]regex[/code], [code]choices[/code] (strings),
## [code]grammar[/code] (Lark) or [code]tools[/code] (with [code]tool_choice[/code]); without one
## the line goes out with [member tools], if any. The request's [member LoraloomRequest.json],
## [member LoraloomRequest.tool_calls] and [member LoraloomRequest.constraint] hold the outcome.
func ask_request(text: String, constraint: Dictionary = {}) -> LoraloomRequest:
	var connection := _client()
	var request_id := "gd-orphan-%d" % Time.get_ticks_usec()
	if connection != null:
		request_id = connection.new_id()
	var request := LoraloomRequest.new(request_id, {})
	_requests[request.id] = request
	request.event_received.connect(_on_event)
	request.finished.connect(_on_finished)
	_waiting.append({"request": request, "text": text, "constraint": constraint.duplicate(true)})
	_send_next()
	return request


## Says [param text] and returns the reply as JSON valid against [param schema] (a JSON Schema),
## parsed: the [Dictionary] of an object schema ([code]{}[/code] when the line failed:
## [signal request_failed] says why). [signal json_received] carries it too (and any other JSON
## value, for schemas that are not objects: see [member LoraloomRequest.json]). Bound the strings,
## arrays and numbers of the schema so that a reply fits [member max_tokens].
func ask_json(text: String, schema: Dictionary) -> Dictionary:
	var request := await _ask_until_done(text, {"json_schema": schema})
	return request.json if request.ok and request.json is Dictionary else {}


## Says [param text] and returns exactly one of [param choices] (the game's actions, say), or an
## empty string when the line failed.
func ask_choice(text: String, choices: PackedStringArray) -> String:
	var request := await _ask_until_done(text, {"choices": Array(choices)})
	return request.text if request.ok else ""


## Says [param text] and returns a reply that matches [param pattern] as a whole (Rust
## [code]regex[/code] syntax), or an empty string when the line failed.
func ask_regex(text: String, pattern: String) -> String:
	var request := await _ask_until_done(text, {"regex": pattern})
	return request.text if request.ok else ""


## Says [param text] and returns a reply that matches [param grammar] (Lark, llguidance's
## dialect), or an empty string when the line failed.
func ask_grammar(text: String, grammar: String) -> String:
	var request := await _ask_until_done(text, {"grammar": grammar})
	return request.text if request.ok else ""


## Says [param text] with [param line_tools] (or else [member tools]) and [param choice] (or else
## [member tool_choice]) and returns the calls the model made
## ([code][{"name": ..., "arguments": {...}}][/code]; empty when it answered in words or the line
## failed). Each call also emits [signal tool_called].
func ask_tool_calls(text: String, line_tools: Array = [], choice: String = "") -> Array:
	var offered: Array = line_tools if not line_tools.is_empty() else Array(tools)
	var request := await _ask_until_done(text, {
		"tools": offered, "tool_choice": choice if not choice.is_empty() else tool_choice})
	return request.tool_calls if request.ok else []


## The [code]generate[/code] frame a line saying [param text] would go out with now (no id), with
## [param constraint] as in [method ask_request].
func build_request(text: String, constraint: Dictionary = {}) -> Dictionary:
	_sync_conversation()
	var fields := {
		"adapters": [] if adapter.is_empty() else [{"name": adapter, "scale": adapter_scale}],
		"messages": conversation.build_messages(text),
		"max_tokens": max_tokens,
		"temperature": temperature,
		"top_k": top_k,
		"top_p": top_p,
		"repetition_penalty": repetition_penalty,
		"seed": random_seed if random_seed >= 0 else null,
		"stop": Array(stop_sequences),
		"stream": true,
		"priority": priority,
		"trim_history": true,
	}
	var chosen := CONSTRAINTS.filter(func(key: String) -> bool: return constraint.get(key) != null)
	if chosen.is_empty() and not tools.is_empty():
		constraint = {"tools": Array(tools), "tool_choice": tool_choice}
	for key: String in CONSTRAINTS + ["tool_choice"]:
		if constraint.get(key) != null:
			fields[key] = _json_numbers(constraint[key])
	return LoraloomFrames.build(LoraloomProtocol.GENERATE, fields)


## Ends the line being answered now: it finishes with what was said so far (the daemon stops
## working on it). Lines asked after it still go out.
func stop_generation() -> void:
	if not _current.is_empty():
		(_current["request"] as LoraloomRequest).cancel()


## Deprecated: [method stop_generation] (with an id: stops that line, if it is being answered).
func stop(request_id: String = "") -> void:
	if request_id.is_empty() or (not _current.is_empty() and _current["request"].id == request_id):
		stop_generation()


## The text received so far for [param request_id].
func get_text(request_id: String) -> String:
	var request: LoraloomRequest = _requests.get(request_id)
	return request.text if request != null else ""


## True while [param request_id] (or, when empty, any line of this node) is answered or waits.
func is_busy(request_id: String = "") -> bool:
	for key: String in _requests:
		var request: LoraloomRequest = _requests[key]
		if not request.done and (request_id.is_empty() or key == request_id):
			return true
	return false


## Forgets the conversation (the persona stays).
func clear_history() -> void:
	conversation.clear()


## The persona and the history as plain JSON, for a save game.
func save_conversation() -> String:
	_sync_conversation()
	return conversation.to_json()


## Restores what [method save_conversation] wrote, persona included; returns [constant OK], or an
## error with nothing changed. To keep this node's persona, assign [member history] instead.
func load_conversation(json: String) -> Error:
	_sync_conversation()
	var err := conversation.load_json(json)
	if err == OK:
		system_prompt = conversation.system_prompt
	return err


func _sync_conversation() -> void:
	conversation.system_prompt = system_prompt
	conversation.keep_history = keep_history
	conversation.max_history_turns = max_history_turns


func _send_next() -> void:
	if not _current.is_empty() or _waiting.is_empty() or _closing:
		return
	_current = _waiting.pop_front()
	var request: LoraloomRequest = _current["request"]
	var frame := build_request(_current["text"], _current["constraint"])
	request.require_constraint = _requires_match(frame)
	_current["generation"] = conversation.generation
	var connection := _client()
	if connection == null:
		request.fail.call_deferred(LoraloomRequest.ERROR_NOT_CONNECTED,
				"no LoraloomClient: enable the loraloom plugin (its autoload) or set client")
		return
	connection.send_request(frame, request)
	var tree := Engine.get_main_loop() as SceneTree
	if tree != null:
		tree.create_timer(answer_timeout, true, false, true).timeout.connect(
				_on_answer_timeout.bind(request))


func _ask_until_done(text: String, constraint: Dictionary) -> LoraloomRequest:
	var request := ask_request(text, constraint)
	if not request.done:
		await request.finished  # bounded, as in ask()
	return request


## Whether a line must match its constraint to succeed: any constraint, and tools that must be
## called (auto may answer in words, which can end anywhere).
static func _requires_match(frame: Dictionary) -> bool:
	for key: String in ["json_schema", "regex", "choices", "grammar"]:
		if frame.has(key):
			return true
	return frame.has("tools") and not frame.get("tool_choice") in ["auto", "none"]


## [param value] with whole floats turned into ints, in nested dictionaries and arrays too: JSON
## parsed by Godot has only floats, and a schema's [code]maxItems: 3.0[/code] must go out as 3.
static func _json_numbers(value: Variant) -> Variant:
	match typeof(value):
		TYPE_FLOAT:
			var number: float = value
			if is_finite(number) and number == floorf(number) and absf(number) < 9.0e15:
				return int(number)
		TYPE_DICTIONARY:
			var out := {}
			for key: Variant in value:
				out[key] = _json_numbers(value[key])
			return out
		TYPE_ARRAY:
			var items: Array = []
			for item: Variant in value:
				items.append(_json_numbers(item))
			return items
	return value


func _on_answer_timeout(request: LoraloomRequest) -> void:
	# The client tells the daemon to stop a request that fails here while it works on it.
	request.fail(LoraloomRequest.ERROR_TIMEOUT, "no answer within %.0f s" % answer_timeout)


func _on_event(_request: LoraloomRequest, event: Dictionary) -> void:
	if event.get("type") == LoraloomProtocol.CHUNK and not _closing:
		response_updated.emit(str(event.get("text", "")))


func _on_finished(request: LoraloomRequest) -> void:
	# Finished requests stay readable through wait() and get_text() until the next few lines.
	_forget_finished(32)
	var line: Dictionary = _current if _current.get("request") == request else {}
	if _closing:
		return
	if request.ok:
		conversation.record(str(line.get("text", "")), request.text, request.finish_reason,
				int(request.result.get("dropped_messages", 0)), int(line.get("generation", -1)))
		for call: Variant in request.tool_calls:
			if call is Dictionary:
				tool_called.emit(str(call.get("name", "")), call.get("arguments", {}))
		if request.message.has("json_schema") and request.json != null:
			json_received.emit(request.json)
		response_finished.emit(request.text)
	else:
		request_failed.emit(request.error_code, request.error_message)
	if not line.is_empty():
		_current = {}
		_send_next()


func _abandon_lines() -> void:
	# Freed: nothing more is emitted; the line in flight stops on the daemon and every awaiting
	# ask() returns.
	_closing = true
	var lines := _waiting.duplicate()
	_waiting.clear()
	if not _current.is_empty():
		lines.push_front(_current)
		_current = {}
	for line: Dictionary in lines:
		var request: LoraloomRequest = line["request"]
		request.fail(LoraloomRequest.ERROR_CANCELLED, "the chat node was freed")
