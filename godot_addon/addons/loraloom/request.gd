class_name LoraloomRequest
extends RefCounted
## One request sent to the daemon, from its start to its end; awaitable.
##
## [LoraloomClient] creates these and feeds them the daemon's events. Nodes such as
## [LoraloomChat] turn them into their own signals; game code may also [code]await[/code]
## [method wait] directly:
## [codeblock]
## var request := Loraloom.send_request({"type": "ping"})
## await request.wait(5.0)
## if request.ok:
##     print(request.result)
## [/codeblock]
## Besides the protocol's error codes ([code]LoraloomProtocol.ERROR_*[/code]), a request can fail
## with the addon's own codes below.

## Emitted for every event the daemon sends about this request (chunk, result, error, ...).
signal event_received(request: LoraloomRequest, event: Dictionary)
## Emitted once, when the request ends, whether it succeeded or failed.
signal finished(request: LoraloomRequest)

## The request could not reach the daemon: no connection, or none within the connect timeout.
const ERROR_NOT_CONNECTED := LoraloomProtocol.ERROR_NOT_CONNECTED
## The caller's [method wait] ran out of time; the request was cancelled on the daemon.
const ERROR_TIMEOUT := LoraloomProtocol.ERROR_TIMEOUT
## Kept for older code: a request stopped before it was sent now ends like one stopped on the
## daemon, with its result (finish reason [code]cancelled[/code]), not with this code.
const ERROR_CANCELLED := LoraloomProtocol.ERROR_CANCELLED
## A constrained line ([member require_constraint]) ended before its output matched the constraint
## (it ran into [code]max_tokens[/code], the context, a stop string or was cancelled); its
## [member result] and [member text] are kept.
const ERROR_INCOMPLETE := LoraloomProtocol.RESULT_CONSTRAINT_INCOMPLETE

## The client-chosen id; every event about this request carries it.
var id: String = ""
## The frame that was sent, as a dictionary.
var message: Dictionary = {}
## True once the request has ended (see [member ok]).
var done: bool = false
## True when the request ended with its result (even a cancelled one).
var ok: bool = false
## Text received so far (text requests); the whole text once done.
var text: String = ""
## The number of [code]chunk[/code] events received.
var chunk_count: int = 0
## True once the daemon sent anything about this request. Until then a text or image request
## whose connection drops is sent again on the next one (see [LoraloomClient]).
var answered: bool = false
## The final event ([code]result[/code], [code]image_result[/code], [code]adapters[/code], ...).
var result: Dictionary = {}
## Why a text request stopped: [code]stop[/code], [code]length[/code] or [code]cancelled[/code].
var finish_reason: String = ""
## With [code]json_schema[/code]: the output parsed (null when it failed or was incomplete).
var json: Variant = null
## With [code]tools[/code]: the calls the model made, each
## [code]{"name": ..., "arguments": {...}}[/code].
var tool_calls: Array = []
## With a constraint or tools: [code]satisfied[/code] or [code]incomplete[/code]; empty otherwise.
var constraint: String = ""
## Fail with [constant ERROR_INCOMPLETE] when the result says the constraint is incomplete
## (instead of succeeding with a partial output); [LoraloomChat] sets it on constrained lines.
var require_constraint: bool = false
## The error code when the request failed.
var error_code: String = ""
## The error message when the request failed.
var error_message: String = ""

var _cancel: Callable


func _init(request_id: String, frame: Dictionary, cancel_request: Callable = Callable()) -> void:
	id = request_id
	message = frame
	_cancel = cancel_request


## Sets what [method cancel] and a timed-out [method wait] call to stop the request on the daemon
## (the client does this when it sends the request).
func bind_cancel(cancel_request: Callable) -> void:
	_cancel = cancel_request


## Asks for the request to be stopped; it still ends with its result (finish reason
## [code]cancelled[/code]). Nothing happens once it is done or before it was sent.
func cancel() -> void:
	if not done and _cancel.is_valid():
		_cancel.call(id)


## Waits until the request ends, at most [param timeout_s] seconds, and returns this request.
## On timeout the request is cancelled on the daemon and fails with code [code]timeout[/code].
func wait(timeout_s: float = 60.0) -> LoraloomRequest:
	if done:
		return self
	var tree := Engine.get_main_loop() as SceneTree
	if tree != null and timeout_s >= 0.0:
		tree.create_timer(timeout_s, true, false, true).timeout.connect(_on_wait_timeout)
	await finished
	return self


## Handles one event from the daemon (called by [LoraloomClient]).
func handle_event(event: Dictionary) -> void:
	if done:
		return
	answered = true
	var kind: String = event.get("type", "")
	if kind == LoraloomProtocol.CHUNK:
		chunk_count += 1
		text += str(event.get("text", ""))
	event_received.emit(self, event)
	match kind:
		LoraloomProtocol.ERROR:
			fail(str(event.get("code", LoraloomProtocol.ERROR_INTERNAL)), str(event.get("message", "")))
		LoraloomProtocol.RESULT:
			_take_result(event)
		LoraloomProtocol.IMAGE_RESULT:
			var default_reason: String = LoraloomProtocol.IMAGE_RESULT_DEFAULTS["finish_reason"]
			finish_reason = str(event.get("finish_reason", default_reason))
			_succeed(event)
		LoraloomProtocol.ADAPTERS, LoraloomProtocol.PONG, LoraloomProtocol.BUDGET:
			_succeed(event)


## Ends the request as failed (no-op once done).
func fail(code: String, reason: String) -> void:
	if done:
		return
	done = true
	error_code = code
	error_message = reason
	finished.emit(self)


func _take_result(event: Dictionary) -> void:
	text = str(event.get("text", text))
	finish_reason = str(event.get("finish_reason", ""))
	json = event.get("json")
	var calls: Variant = event.get("tool_calls", [])
	tool_calls = calls if calls is Array else []
	constraint = str(event.get("constraint", "")) if event.get("constraint") != null else ""
	if require_constraint and constraint == LoraloomProtocol.RESULT_CONSTRAINT_INCOMPLETE:
		result = event
		fail(ERROR_INCOMPLETE, "the reply ended (%s) before it matched its constraint: raise " % [
				finish_reason] + "max_tokens, or bound the strings, arrays and numbers of the schema")
		return
	_succeed(event)


func _succeed(event: Dictionary) -> void:
	done = true
	ok = true
	result = event
	finished.emit(self)


func _on_wait_timeout() -> void:
	# The client then tells the daemon to stop it (see LoraloomClient).
	fail(ERROR_TIMEOUT, "no answer within the time the caller waited")
