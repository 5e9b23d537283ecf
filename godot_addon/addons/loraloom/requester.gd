class_name LoraloomRequester
extends Node
## What [LoraloomChat] and [LoraloomImage] share: sending frames through the client, keeping
## their requests, stopping and awaiting them. Not meant to be used on its own.

## The client to use; null means the game's autoload (see [method LoraloomClient.find]).
var client: LoraloomClient

var _requests: Dictionary = {}


## Stops [param request_id], or every request of this node when empty. Each stopped request
## still ends (finish reason [code]cancelled[/code]).
func stop(request_id: String = "") -> void:
	var connection := _client()
	for key: String in _requests.keys():
		if connection != null and (request_id.is_empty() or key == request_id):
			connection.cancel(key)


## Stops what this node is generating (each stopped request ends with what it made so far).
func stop_generation() -> void:
	stop()


## Waits for [param request_id] to end (at most [param timeout_s] seconds) and returns its
## [LoraloomRequest]: [member LoraloomRequest.ok], its result, or the error.
func wait(request_id: String, timeout_s: float = 60.0) -> LoraloomRequest:
	var request: LoraloomRequest = _requests.get(request_id)
	if request == null:
		request = LoraloomRequest.new(request_id, {})
		request.fail(LoraloomProtocol.ERROR_UNKNOWN_REQUEST,
				"this node has no request '%s'" % request_id)
		return request
	return await request.wait(timeout_s)


## Sends [param frame] (or fails it at once when there is no client) and keeps the request;
## its events reach [method _on_event] and its end [method _on_finished].
func _send(frame: Dictionary) -> LoraloomRequest:
	var connection := _client()
	var request: LoraloomRequest
	if connection != null:
		request = connection.send_request(frame)
	else:
		request = LoraloomRequest.new("gd-orphan-%d" % Time.get_ticks_usec(), frame)
		request.fail.call_deferred(LoraloomRequest.ERROR_NOT_CONNECTED,
				"no LoraloomClient: enable the loraloom plugin (its autoload) or set client")
	_requests[request.id] = request
	request.event_received.connect(_on_event)
	request.finished.connect(_on_finished)
	return request


func _client() -> LoraloomClient:
	if client != null:
		return client
	return LoraloomClient.find(self)


## Finished requests stay readable through [method wait] for a while; the oldest go first.
func _forget_finished(keep: int) -> void:
	var finished: Array = []
	for key: String in _requests:
		if (_requests[key] as LoraloomRequest).done:
			finished.append(key)
	while finished.size() > keep:
		_requests.erase(finished.pop_front())


func _on_event(_request: LoraloomRequest, _event: Dictionary) -> void:
	pass


func _on_finished(_request: LoraloomRequest) -> void:
	pass
