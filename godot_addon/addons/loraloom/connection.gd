class_name LoraloomConnection
extends RefCounted
## The life cycle of a [LoraloomClient]'s WebSocket: finding the daemon, connecting, the
## [code]hello[/code]/[code]welcome[/code] handshake, the read loop and reconnecting.
##
## The client owns one and polls it every frame. An attempt connects to [member
## LoraloomClient.url] with [member LoraloomClient.token], or reads the runtime file for what is
## empty, and must finish its handshake within [member LoraloomClient.connect_timeout]. After a
## failed attempt or a dropped connection the next one follows with growing delays, up to
## [constant MAX_RETRY_DELAY] seconds; a refused hello waits the longest. Each frame read goes
## where it belongs: the handshake, the adapter list ([member LoraloomClient.adapters]) or its
## request (in the client's [LoraloomOutbox]). After each handshake it subscribes to adapter
## events, sends the GPU budget and sends the requests that waited.[br]
## It keeps the client's [member LoraloomClient.state], [member LoraloomClient.welcome] and
## [member LoraloomClient.last_error] and emits its connection signals itself, so that they come
## in the order of the events behind them.

## The longest wait between two attempts to connect, in seconds.
const MAX_RETRY_DELAY := 10.0
const _FIRST_RETRY_DELAY := 0.5

## True from the daemon's [code]shutting_down[/code] until the connection closes: requests made
## meanwhile wait for the next one.
var going_away: bool = false

var _client: LoraloomClient
var _outbox: LoraloomOutbox
var _peer: WebSocketPeer
var _codec := LoraloomMsgpack.new()
var _attempt_started: float = 0.0
var _retry_at: float = -1.0
var _retry_delay: float = _FIRST_RETRY_DELAY
var _pending_token: String = ""
var _handshake_refused: bool = false
var _subscribe_id: String = ""
var _daemon_start_tried: bool = false
var _ever_connected: bool = false
var _frame_bytes := PackedByteArray()


func _init(client: LoraloomClient, outbox: LoraloomOutbox) -> void:
	_client = client
	_outbox = outbox


## The clock of the life cycle: seconds since the engine started.
static func now() -> float:
	return Time.get_ticks_msec() / 1000.0


## Whether a socket is open or opening (the handshake may not be done).
func is_open() -> bool:
	return _peer != null


## Whether an attempt to connect is scheduled.
func is_retrying() -> bool:
	return _retry_at >= 0.0


## Called every frame: starts the attempt that is due, or reads what arrived.
func poll(at: float) -> void:
	if _peer == null:
		if _retry_at >= 0.0 and at >= _retry_at:
			_retry_at = -1.0
			_open()
	else:
		_read(at)


## Closes the socket, if any, and starts a new attempt at once, with the shortest delays again.
func reopen() -> void:
	_close_peer()
	_retry_delay = _FIRST_RETRY_DELAY
	_retry_at = -1.0
	_open()


## Closes the socket, if any, and stops reconnecting.
func close() -> void:
	_retry_at = -1.0
	_close_peer()


## Sends [param frame]. When it cannot be encoded its request fails with
## [code]bad_message[/code]; when it cannot go out, its request waits for the next connection
## (see [method LoraloomOutbox.may_resend]) or fails with [code]connection_closed[/code].
func send(frame: Dictionary) -> void:
	var bytes := _codec.encode(frame)
	if bytes.is_empty():
		var request := _outbox.find(str(frame.get("id", "")))
		if request != null:
			request.fail(LoraloomProtocol.ERROR_BAD_MESSAGE,
					"cannot encode the request: %s" % _codec.error)
		return
	if _peer == null or _peer.send(bytes) != OK:
		var request := _outbox.find(str(frame.get("id", "")))
		if request != null and LoraloomOutbox.may_resend(request, _client.auto_reconnect):
			_outbox.hold(request, now())  # the connection is closing: nothing went out
		elif request != null:
			request.fail(LoraloomProtocol.ERROR_CONNECTION_CLOSED, "cannot send to the daemon")


## Sends the client's [member LoraloomClient.budget] ([param always]: even when it sets no limit,
## which clears one set before); the daemon's answer becomes
## [member LoraloomClient.budget_in_force].
func send_budget(always: bool) -> LoraloomRequest:
	var budget := _client.budget
	if not always and not budget.is_active():
		return null
	var fields := budget.set_budget_fields() if budget.enabled else {}
	fields["type"] = LoraloomProtocol.SET_BUDGET
	var request := _client.send_request(fields)
	request.finished.connect(_on_budget_answered)
	return request


## Reports a frame start (frame sync); returns whether it went out. [param game_ms], the GPU time
## the game's own work took in its last frame (ms, 0 to 1000), goes with it; anything else (the
## default -1, NaN, above 1000) is left out, and the daemon keeps the budget's [code]game_ms[/code].
func send_frame_start(game_ms: float = -1.0) -> bool:
	if _peer == null or going_away:
		return false
	if game_ms >= 0.0 and game_ms <= 1000.0:
		var measured := LoraloomFrames.build(LoraloomProtocol.FRAME, {"game_ms": game_ms})
		return _peer.send(_codec.encode(measured)) == OK
	# Without a time, the same few bytes every frame: encoded once.
	if _frame_bytes.is_empty():
		_frame_bytes = _codec.encode(LoraloomFrames.build(LoraloomProtocol.FRAME))
	return _peer.send(_frame_bytes) == OK


# ---------------------------------------------------------------- attempts


func _open() -> void:
	var target := _client.url
	var secret := _client.token
	if target.is_empty() or secret.is_empty():
		var path := _client.runtime_file
		if path.is_empty():
			path = LoraloomDiscovery.default_runtime_file()
		var info := LoraloomDiscovery.read_runtime_file(path)
		if info.has("error"):
			_attempt_failed(info["error"], true)
			return
		target = target if not target.is_empty() else str(info["url"])
		secret = secret if not secret.is_empty() else str(info["token"])
	_peer = WebSocketPeer.new()
	_peer.inbound_buffer_size = _client.max_frame_bytes
	_peer.outbound_buffer_size = _client.max_frame_bytes
	_peer.max_queued_packets = 4096
	_handshake_refused = false
	var err := _peer.connect_to_url(target)
	if err != OK:
		_peer = null
		_attempt_failed("cannot connect to %s: %s" % [target, error_string(err)], true)
		return
	_client.state = LoraloomClient.State.CONNECTING
	_attempt_started = now()
	_pending_token = secret


func _attempt_failed(reason: String, daemon_missing: bool) -> void:
	_client.state = LoraloomClient.State.DISCONNECTED
	_client.last_error = reason
	if daemon_missing and _client.auto_start_daemon and not _daemon_start_tried:
		_daemon_start_tried = true
		_client.start_daemon()
	_client.connection_failed.emit(reason)
	_report_to_editor("connection_failed", {"reason": reason})
	_schedule_retry()


func _schedule_retry() -> void:
	if not _client.auto_reconnect and not _outbox.has_waiting():
		_outbox.fail_all(LoraloomRequest.ERROR_NOT_CONNECTED, _client.last_error)
		return
	_retry_at = now() + _retry_delay
	_retry_delay = minf(_retry_delay * 2.0, MAX_RETRY_DELAY)


func _close_peer() -> void:
	if _peer != null:
		_peer.close(1000, "bye")
		_peer = null
	_client.state = LoraloomClient.State.DISCONNECTED
	going_away = false


# ---------------------------------------------------------------- the read loop


func _read(at: float) -> void:
	_peer.poll()
	var ready_state := _peer.get_ready_state()
	if ready_state == WebSocketPeer.STATE_OPEN and _client.state == LoraloomClient.State.CONNECTING:
		_client.state = LoraloomClient.State.HANDSHAKING
		var hello := LoraloomFrames.build(LoraloomProtocol.HELLO, {
			"protocol": LoraloomClient.PROTOCOL_VERSION,
			"token": _pending_token,
			"client": _client.client_name,
		})
		_pending_token = ""
		send(hello)
	while _peer != null and _peer.get_available_packet_count() > 0:
		var packet := _peer.get_packet()
		if _peer.was_string_packet():
			continue
		var frame: Variant = _codec.decode(packet)
		if typeof(frame) != TYPE_DICTIONARY:
			push_warning("loraloom: unreadable frame from the daemon: %s" % _codec.error)
			continue
		_route(frame)
	if _peer == null:
		return
	if _peer.get_ready_state() == WebSocketPeer.STATE_CLOSED:
		_on_closed(_peer.get_close_code(), _peer.get_close_reason())
	elif (_client.state != LoraloomClient.State.READY
			and at - _attempt_started > _client.connect_timeout):
		_close_peer()
		_attempt_failed("no answer from the daemon within %.0f s" % _client.connect_timeout, false)


func _route(frame: Dictionary) -> void:
	var kind: String = str(frame.get("type", ""))
	if _client.state == LoraloomClient.State.HANDSHAKING:
		_handshake(kind, frame)
	elif kind == LoraloomProtocol.ADAPTER_EVENT:
		_on_adapter_event(frame)
	else:
		var request_id := str(frame.get("id", "")) if frame.get("id") != null else ""
		var request := _outbox.find(request_id)
		if kind == LoraloomProtocol.ADAPTERS:
			_set_adapters(frame.get("adapters", []))
		var stopping: bool = (kind == LoraloomProtocol.ERROR
				and frame.get("code") == LoraloomProtocol.ERROR_SHUTTING_DOWN)
		if stopping:
			# The daemon ends what is in flight, then closes: requests made from now on wait for
			# the next connection instead of going out on this one.
			going_away = true
		if (request != null and stopping
				and LoraloomOutbox.may_resend(request, _client.auto_reconnect)):
			# Stopped before it produced anything: the next daemon answers it.
			_outbox.hold(request, now())
		elif request != null:
			request.handle_event(frame)
		elif kind == LoraloomProtocol.ERROR:
			push_warning("loraloom: %s: %s" % [frame.get("code"), frame.get("message")])
	_client.message_received.emit(frame)
	_report_to_editor(kind, frame)


func _handshake(kind: String, frame: Dictionary) -> void:
	if kind == LoraloomProtocol.WELCOME:
		_client.state = LoraloomClient.State.READY
		going_away = false
		_client.welcome = frame
		_client.last_error = ""
		_retry_delay = _FIRST_RETRY_DELAY
		_set_adapters(frame.get("adapters", []))
		_subscribe_id = _client.new_id()
		send(LoraloomFrames.build(LoraloomProtocol.SUBSCRIBE, {"id": _subscribe_id}))
		send_budget(false)
		for request: LoraloomRequest in _outbox.take_waiting():
			if not request.done:
				send(request.message)
		var again := _ever_connected
		_ever_connected = true
		_client.connected.emit(_client.welcome)
		if again:
			_client.reconnected.emit(_client.welcome)
	elif kind == LoraloomProtocol.ERROR:
		# The daemon closes after a refused hello; a retry with the same token would fail again
		# until the runtime file (and so the token) changes, so it waits the longest delay.
		_handshake_refused = true
		_client.last_error = "%s: %s" % [frame.get("code"), frame.get("message")]
		_close_peer()
		_retry_delay = MAX_RETRY_DELAY
		_attempt_failed(_client.last_error, false)
	else:
		push_warning("loraloom: expected '%s', got '%s'" % [LoraloomProtocol.WELCOME, kind])


func _on_adapter_event(frame: Dictionary) -> void:
	var info: Dictionary = frame.get("adapter", {})
	var adapter_name := str(info.get("name", ""))
	var event := str(frame.get("event", ""))
	if event == LoraloomProtocol.ADAPTER_EVENT_KIND_REMOVED:
		_client.adapters.erase(adapter_name)
	elif not adapter_name.is_empty():
		_client.adapters[adapter_name] = info
	_client.adapter_changed.emit(adapter_name, event, info)


func _set_adapters(items: Array) -> void:
	_client.adapters.clear()
	for info: Variant in items:
		if typeof(info) == TYPE_DICTIONARY:
			_client.adapters[str(info.get("name", ""))] = info
	_client.adapters_updated.emit(_client.adapters)


func _on_closed(code: int, reason: String) -> void:
	var was_ready := _client.state == LoraloomClient.State.READY
	_peer = null
	_client.state = LoraloomClient.State.DISCONNECTED
	going_away = false
	_client.welcome = {}
	if code < 0:
		code = 1006  # no close frame: the connection broke (or was never made)
	# The retry is scheduled first, so that lines the failures below send next wait for it.
	if was_ready and _client.auto_reconnect:
		_schedule_retry()
	# Only what went out on this connection fails; requests waiting for one keep waiting.
	_outbox.fail_sent(LoraloomProtocol.ERROR_CONNECTION_CLOSED,
			"the connection to the daemon closed (%d %s)" % [code, reason],
			_client.auto_reconnect, now())
	if was_ready:
		if not _client.auto_reconnect:
			_schedule_retry()
		_client.disconnected.emit(code, reason)
		_report_to_editor("disconnected", {"code": code, "reason": reason})
	elif not _handshake_refused:
		_attempt_failed("the daemon closed the connection (%d %s)" % [code, reason], true)


func _on_budget_answered(request: LoraloomRequest) -> void:
	if request.ok:
		_client.budget_in_force = request.result
		_client.budget_changed.emit(request.result)
	elif request.error_code != LoraloomProtocol.ERROR_CONNECTION_CLOSED:
		push_warning("loraloom: the GPU budget was refused: %s: %s" % [
				request.error_code, request.error_message])


func _report_to_editor(kind: String, frame: Dictionary) -> void:
	# The editor dock shows what the running game sees; frames with payloads stay out of it.
	var payloads := [
		LoraloomProtocol.CHUNK, LoraloomProtocol.IMAGE_PROGRESS, LoraloomProtocol.IMAGE_RESULT]
	if not EngineDebugger.is_active() or kind in payloads:
		return
	EngineDebugger.send_message("loraloom:event", [kind, _client.state, frame.duplicate(true)])
