class_name LoraloomChat
extends LoraloomRequester
## One conversation with the daemon's text model through one adapter: an NPC's voice.
##
## Many chat nodes share the one connection (the autoload [code]Loraloom[/code]) and the one base
## model; each request names this node's adapter, so NPCs on different adapters are batched
## together by the daemon. The node keeps the conversation history and sends it with every
## [method ask] (rendered with the model's chat template).
## [codeblock]
## @onready var npc: LoraloomChat = $Pirate
##
## func _ready() -> void:
##     npc.response_updated.connect(func(_id: String, token: String) -> void: label.text += token)
##     var request := await npc.wait(npc.ask("Who goes there?"))
##     if not request.ok:
##         push_warning(request.error_message)
## [/codeblock]

## Emitted for every piece of text as it arrives. [param token] is the new text only;
## [method get_text] gives the text so far.
signal response_updated(request_id: String, token: String)
## Emitted when a request finished; [param text] is the whole answer (also after [method stop],
## with what was generated until then).
signal response_finished(request_id: String, text: String)
## Emitted when a request failed: [param code] is the protocol's error code (for example
## [code]unknown_adapter[/code]) or a client-side one ([code]not_connected[/code],
## [code]connection_closed[/code], [code]timeout[/code]).
signal request_failed(request_id: String, code: String, message: String)

# The protocol's defaults, as constants so that the inspector shows them.
const _DEFAULTS := LoraloomProtocol.GENERATE_DEFAULTS
const _ADAPTER_DEFAULTS := LoraloomProtocol.ADAPTER_REF_DEFAULTS

## The adapter that gives this node its voice (a folder name in the daemon's adapter folder);
## empty uses the base model.
@export var adapter: String = ""
## How strongly the adapter applies: 1 as trained, 0 none, negative values push away from it.
@export_range(-8.0, 8.0, 0.05) var adapter_scale: float = _ADAPTER_DEFAULTS["scale"]
## The system prompt sent before the conversation; empty sends none.
@export_multiline var system_prompt: String = ""
## Remember the exchanges and send them with each new question.
@export var keep_history: bool = true
## The most question-and-answer pairs kept; older ones are dropped first.
@export_range(0, 256) var max_history_turns: int = 16

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

## The conversation so far: [code]{"role": "user"|"assistant", "content": String}[/code] turns
## (roles: [code]LoraloomProtocol.CHAT_ROLE_*[/code]).
var history: Array[Dictionary] = []
var _questions: Dictionary = {}


## Sends [param text] as the player's next line and returns the request id. The answer streams
## through [signal response_updated] and ends with [signal response_finished] or
## [signal request_failed]; [method wait] awaits it.
func ask(text: String) -> String:
	var request := _send(build_request(text))
	_questions[request.id] = text
	return request.id


## The [code]generate[/code] frame [method ask] sends for [param text] (without its id).
func build_request(text: String) -> Dictionary:
	var messages: Array[Dictionary] = []
	if not system_prompt.is_empty():
		messages.append({"role": LoraloomProtocol.CHAT_ROLE_SYSTEM, "content": system_prompt})
	if keep_history:
		messages.append_array(history)
	messages.append({"role": LoraloomProtocol.CHAT_ROLE_USER, "content": text})
	return LoraloomFrames.build(LoraloomProtocol.GENERATE, {
		"adapters": [] if adapter.is_empty() else [{"name": adapter, "scale": adapter_scale}],
		"messages": messages,
		"max_tokens": max_tokens,
		"temperature": temperature,
		"top_k": top_k,
		"top_p": top_p,
		"repetition_penalty": repetition_penalty,
		"seed": random_seed if random_seed >= 0 else null,
		"stop": Array(stop_sequences),
		"stream": true,
	})


## The text received so far for [param request_id].
func get_text(request_id: String) -> String:
	var request: LoraloomRequest = _requests.get(request_id)
	return request.text if request != null else ""


## True while [param request_id] (or, when empty, any request of this node) is running.
func is_busy(request_id: String = "") -> bool:
	for key: String in _requests:
		var request: LoraloomRequest = _requests[key]
		if not request.done and (request_id.is_empty() or key == request_id):
			return true
	return false


## Forgets the conversation.
func clear_history() -> void:
	history.clear()


func _on_event(request: LoraloomRequest, event: Dictionary) -> void:
	if event.get("type") == LoraloomProtocol.CHUNK:
		response_updated.emit(request.id, str(event.get("text", "")))


func _on_finished(request: LoraloomRequest) -> void:
	var question: String = _questions.get(request.id, "")
	_questions.erase(request.id)
	# Finished requests stay readable through wait() and get_text() until the next few asks.
	_forget_finished(32)
	if not request.ok:
		request_failed.emit(request.id, request.error_code, request.error_message)
		return
	if keep_history:
		history.append({"role": LoraloomProtocol.CHAT_ROLE_USER, "content": question})
		history.append({"role": LoraloomProtocol.CHAT_ROLE_ASSISTANT, "content": request.text})
		while history.size() > max_history_turns * 2:
			history.pop_front()
			history.pop_front()
	response_finished.emit(request.id, request.text)
