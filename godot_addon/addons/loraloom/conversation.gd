class_name LoraloomConversation
extends RefCounted
## A persona (system prompt) and the recent turns of one chat, kept to what the daemon's context
## holds. [LoraloomChat] keeps one; it can also be used on its own.
##
## Trimming: every line goes out with the persona, the whole history and
## [code]trim_history[/code] on. When that does not fit the context with room for the reply, the
## daemon leaves out the oldest whole turns (counted in its own tokens; never system messages,
## never the new line), cutting down to 3/4 of its budget so that the following lines keep the
## same prefix, and with it the keys and values it has cached. Its [code]result[/code] says how
## many messages it left out ([code]dropped_messages[/code], counted after the leading system
## messages) and [method record] forgets the same ones.[br]
## Saving: [method to_json] gives plain JSON,
## [code]{"system_prompt": "...", "history": [{"role": "user", "content": "..."}, ...]}[/code],
## the same form the Unity package and the Python client write.

## The roles a history message may have.
const ROLES := [
	LoraloomProtocol.CHAT_ROLE_SYSTEM, LoraloomProtocol.CHAT_ROLE_USER,
	LoraloomProtocol.CHAT_ROLE_ASSISTANT,
]

## Sent first with every line; empty sends none. Never trimmed.
var system_prompt: String = ""
## False: lines go out with the persona only, and nothing is recorded.
var keep_history: bool = true
## The most turns kept (a turn is a user message and the replies after it); 0 keeps what the
## daemon's context holds. Older turns go first, whole.
var max_history_turns: int = 0
## The turns so far, oldest first, as [code]{"role": ..., "content": ...}[/code] dictionaries.
## Reading gives a copy; assigning replaces them (a message that is not such a dictionary is
## left out, with a warning) and counts as a new conversation (see [member generation]).
var history: Array:
	get:
		return _history.duplicate(true)
	set(value):
		_history = _checked(value)
		generation += 1
## Grows each time [member history] is replaced: an answer to a line sent before that belongs to
## another conversation and is not recorded.
var generation: int = 0

var _history: Array[Dictionary] = []


## The messages of a line saying [param text]: the persona, the history and the line.
func build_messages(text: String) -> Array[Dictionary]:
	var messages: Array[Dictionary] = []
	if not system_prompt.is_empty():
		messages.append({"role": LoraloomProtocol.CHAT_ROLE_SYSTEM, "content": system_prompt})
	if keep_history:
		messages.append_array(_history.duplicate(true))
	messages.append({"role": LoraloomProtocol.CHAT_ROLE_USER, "content": text})
	return messages


## Records the end of a line that said [param text], sent while [member generation] was
## [param sent_generation]: forgets what the daemon dropped, then adds the exchange. A reply that
## ended [code]cancelled[/code] with no text is not added.
func record(text: String, reply: String, finish_reason: String, dropped_messages: int,
		sent_generation: int) -> void:
	if sent_generation != generation or not keep_history:
		return
	var lead := _leading_system_messages()
	for i in mini(maxi(dropped_messages, 0), _history.size() - lead):
		_history.remove_at(lead)
	if finish_reason == LoraloomProtocol.FINISH_REASON_CANCELLED and reply.is_empty():
		return
	_history.append({"role": LoraloomProtocol.CHAT_ROLE_USER, "content": text})
	_history.append({"role": LoraloomProtocol.CHAT_ROLE_ASSISTANT, "content": reply})
	if max_history_turns <= 0:
		return
	var starts: Array[int] = []
	for i in range(lead, _history.size()):
		if _history[i]["role"] == LoraloomProtocol.CHAT_ROLE_USER:
			starts.append(i)
	if starts.size() > max_history_turns:
		for i in starts[starts.size() - max_history_turns] - lead:
			_history.remove_at(lead)


## Forgets the turns; the persona stays.
func clear() -> void:
	history = []


## The persona and the history as plain JSON, for a save game.
func to_json() -> String:
	var text := JSON.stringify({"system_prompt": system_prompt, "history": _history}, "", false)
	# JSON.stringify leaves some control characters raw, which JSON does not allow (models do emit
	# them). Outside strings there are none, so every one left is escaped.
	var parts := PackedStringArray()
	var start := 0
	for i in text.length():
		var code := text.unicode_at(i)
		if code < 0x20:
			parts.append(text.substr(start, i - start))
			parts.append("\\u%04x" % code)
			start = i + 1
	parts.append(text.substr(start))
	return "".join(parts)


## Restores what [method to_json] wrote (or the Unity package, or the Python client). Returns
## [constant OK], or [constant ERR_PARSE_ERROR] / [constant ERR_INVALID_DATA] with nothing changed.
func load_json(text: String) -> Error:
	var json := JSON.new()
	if json.parse(text) != OK:
		return ERR_PARSE_ERROR
	var data: Variant = json.data
	if typeof(data) != TYPE_DICTIONARY or typeof(data.get("history")) != TYPE_ARRAY:
		return ERR_INVALID_DATA
	var persona: Variant = data.get("system_prompt", "")
	if persona == null:
		persona = ""
	if typeof(persona) != TYPE_STRING:
		return ERR_INVALID_DATA
	for message: Variant in data["history"]:
		if not is_message(message):
			return ERR_INVALID_DATA
	system_prompt = persona
	history = data["history"]
	return OK


## True for a [code]{"role": system|user|assistant, "content": String}[/code] dictionary.
static func is_message(message: Variant) -> bool:
	return (typeof(message) == TYPE_DICTIONARY and message.get("role") in ROLES
			and typeof(message.get("content")) == TYPE_STRING)


func _leading_system_messages() -> int:
	var lead := 0
	while lead < _history.size() and _history[lead]["role"] == LoraloomProtocol.CHAT_ROLE_SYSTEM:
		lead += 1
	return lead


func _checked(messages: Array) -> Array[Dictionary]:
	var kept: Array[Dictionary] = []
	for message: Variant in messages:
		if is_message(message):
			kept.append({"role": str(message["role"]), "content": str(message["content"])})
		else:
			push_warning("loraloom: not a chat message, left out of the history: %s" % [message])
	return kept
