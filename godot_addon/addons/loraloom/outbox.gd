class_name LoraloomOutbox
extends RefCounted
## The requests of one [LoraloomClient]: those not ended yet, by id, and among them those waiting
## for a connection, with when each began to wait.
##
## It decides what becomes of a request whose connection goes: a text or image request that the
## daemon said nothing about waits for the next connection (it has no side effects and none of
## its output was seen), any other fails. It holds no socket and reads no clock: the client (and
## its [LoraloomConnection]) send what is to be sent and pass the time in seconds.

var _requests: Dictionary = {}
var _waiting: Array[LoraloomRequest] = []
var _waiting_since: Dictionary = {}
var _next_id: int = 1


## Whether [param request] may go out again on the next connection: a text or image request
## (no side effects) that the daemon said nothing about, while the client reconnects
## ([param reconnecting]).
static func may_resend(request: LoraloomRequest, reconnecting: bool) -> bool:
	var kind: Variant = request.message.get("type")
	return (reconnecting and not request.done and not request.answered
			and kind in [LoraloomProtocol.GENERATE, LoraloomProtocol.GENERATE_IMAGE])


## Whether the daemon may still be working on [param request], which this side gave up on (a
## caller's timeout, a freed node): then it is told to stop.
static func abandoned(request: LoraloomRequest) -> bool:
	var given_up := [LoraloomRequest.ERROR_TIMEOUT, LoraloomRequest.ERROR_CANCELLED]
	var kind: Variant = request.message.get("type")
	return (not request.ok and request.error_code in given_up
			and kind in [LoraloomProtocol.GENERATE, LoraloomProtocol.GENERATE_IMAGE])


## How the daemon ends a request cancelled before it started, for one that never left here.
static func cancelled_result(request: LoraloomRequest) -> Dictionary:
	var timings := {"queued_ms": 0.0, "total_ms": 0.0}
	if request.message.get("type") == LoraloomProtocol.GENERATE_IMAGE:
		var seed_used: Variant = request.message.get("seed")
		return LoraloomFrames.build(LoraloomProtocol.IMAGE_RESULT, {
			"id": request.id, "images": [], "seed": seed_used if seed_used != null else 0,
			"width": request.message.get("width", 0), "height": request.message.get("height", 0),
			"finish_reason": LoraloomProtocol.FINISH_REASON_CANCELLED, "timings": timings,
		})
	return LoraloomFrames.build(LoraloomProtocol.RESULT, {
		"id": request.id, "text": "", "finish_reason": LoraloomProtocol.FINISH_REASON_CANCELLED,
		"prompt_tokens": 0, "completion_tokens": 0, "timings": timings,
	})


## A request id unique on this client.
func new_id() -> String:
	var request_id := "gd-%d" % _next_id
	_next_id += 1
	return request_id


## The request [param request_id] that has not ended, or null.
func find(request_id: String) -> LoraloomRequest:
	return _requests.get(request_id)


## The [LoraloomRequest] for [param message] with its frame built ([LoraloomFrames]: defaults
## filled in, an id from [param make_id] when it has none): [param request] when given (its id is
## kept), else a new one. [param cancel] is what stops it.
func prepare(message: Dictionary, request: LoraloomRequest, cancel: Callable,
		make_id: Callable) -> LoraloomRequest:
	var fields := message.duplicate()
	if request != null:
		fields["id"] = request.id
	elif str(fields.get("id", "")).is_empty():
		fields["id"] = make_id.call()
	var frame := LoraloomFrames.build(str(fields.get("type", "")), fields)
	if request == null:
		return LoraloomRequest.new(str(frame["id"]), frame, cancel)
	request.message = frame
	request.bind_cancel(cancel)
	return request


## Keeps [param request] (made by [method prepare]) and returns true; or, when it cannot go out
## (its id is in flight, or the daemon would refuse its frame), returns false and fails it after
## the caller returns, so that its signals can be connected first.
func admit(request: LoraloomRequest) -> bool:
	if _requests.has(request.id):
		request.fail.call_deferred(LoraloomProtocol.ERROR_DUPLICATE_ID,
				"a request with this id is in flight")
		return false
	var problem := LoraloomFrames.check(request.message)
	if not problem.is_empty():
		request.fail.call_deferred(LoraloomProtocol.ERROR_BAD_MESSAGE, problem)
		return false
	_requests[request.id] = request
	return true


## Lets go of [param request], which ended; returns whether it was waiting for a connection.
func forget(request: LoraloomRequest) -> bool:
	_requests.erase(request.id)
	return release(request)


# ---------------------------------------------------------------- waiting for a connection


## Keeps [param request] waiting for a connection, from [param now] on (no-op when it waits).
func hold(request: LoraloomRequest, now: float) -> void:
	if not request in _waiting:
		_waiting.append(request)
		_waiting_since[request.id] = now


## Stops [param request] waiting; returns whether it was waiting.
func release(request: LoraloomRequest) -> bool:
	if not request in _waiting:
		return false
	_waiting.erase(request)
	_waiting_since.erase(request.id)
	return true


## Whether any request waits for a connection.
func has_waiting() -> bool:
	return not _waiting.is_empty()


## Hands over the waiting requests, in the order they began to wait; none waits after.
func take_waiting() -> Array:
	var waiting := _waiting.duplicate()
	_waiting.clear()
	_waiting_since.clear()
	return waiting


## Stops the requests that waited longer than [param wait_s] seconds at [param now] and passes
## each, in turn, to [param fail].
func expire(now: float, wait_s: float, fail: Callable) -> void:
	if _waiting.is_empty():
		return
	for request: LoraloomRequest in _waiting.duplicate():
		if now - float(_waiting_since.get(request.id, now)) > wait_s:
			release(request)
			fail.call(request)


# ---------------------------------------------------------------- when a connection goes


## Fails the requests that went out on the connection (not those waiting for one); those the
## daemon said nothing about yet wait for the next connection instead, while
## [param reconnecting].
func fail_sent(code: String, reason: String, reconnecting: bool, now: float) -> void:
	for request: LoraloomRequest in _requests.values():
		if request in _waiting:
			continue
		if may_resend(request, reconnecting):
			hold(request, now)
		else:
			request.fail(code, reason)


## Fails every request, sent or waiting.
func fail_all(code: String, reason: String) -> void:
	var in_flight: Array = _requests.values()
	_waiting.clear()
	_waiting_since.clear()
	for request: LoraloomRequest in in_flight:
		request.fail(code, reason)
