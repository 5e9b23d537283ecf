extends "res://tests/suite_base.gd"
## The connection's life cycle against a daemon pytest starts and stops on request (the "cold"
## daemon, on a port fixed in advance): a line asked before the daemon exists, a request
## cancelled while it waits for the connection, and the daemon restarted under a conversation,
## stopped with SIGTERM and then killed with SIGKILL.

const TEXT_TIMEOUT := 120.0
## Tokens of a line long enough to be surely still streaming when the daemon goes (the daemon of
## this suite runs an 8192-token context).
const LONG_LINE := 6000

var _cold: Dictionary
var _client: LoraloomClient
var _events: Dictionary = {"connected": 0, "reconnected": 0, "disconnected": [], "failed": 0}


## Runs the suite, reporting through [param runner].
func run(runner: Node) -> void:
	_runner = runner
	_cold = runner.get("config").get("cold", {})
	if _cold.is_empty():
		_report("life:configured", false, "pytest gave no cold daemon")
		return
	_client = LoraloomClient.new()
	add_child(_client)
	_client.connected.connect(func(_welcome: Dictionary) -> void: _events["connected"] += 1)
	_client.reconnected.connect(func(_welcome: Dictionary) -> void: _events["reconnected"] += 1)
	_client.disconnected.connect(func(code: int, _reason: String) -> void:
		_events["disconnected"].append(code))
	_client.connection_failed.connect(func(_reason: String) -> void: _events["failed"] += 1)
	# A daemon takes seconds to start; lines wait that long for it.
	_client.request_connect_wait = 90.0
	if await _check_cold_start():
		await _check_restart("TERM")
		await _check_restart("KILL")
	_client.queue_free()


## True once a ping goes unanswered: the daemon is frozen.
func _until_frozen(timeout_s: float) -> bool:
	var deadline := Time.get_ticks_msec() + int(timeout_s * 1000.0)
	while Time.get_ticks_msec() < deadline:
		var ping := await _client.ping().wait(0.5)
		if ping.error_code == LoraloomRequest.ERROR_TIMEOUT:
			return true
		await get_tree().create_timer(0.1).timeout
	return false


func _new_chat() -> LoraloomChat:
	var chat := LoraloomChat.new()
	chat.client = _client
	chat.adapter = str(_cold.get("adapter", ""))
	chat.system_prompt = "You are a test NPC."
	chat.temperature = 0.0
	chat.max_tokens = 6
	add_child(chat)
	return chat


func _check_cold_start() -> bool:
	var chat := _new_chat()
	_client.connect_to_daemon(str(_cold.get("url")), str(_cold.get("token")))
	# Asked while nothing listens on the daemon's port.
	var early := chat.ask_request("Are you awake?")
	var dropped := _client.send_request({"type": LoraloomProtocol.GENERATE, "prompt": "x"})
	_client.cancel(dropped.id)
	var attempts: bool = await _until(func() -> bool: return _events["failed"] >= 3, 30.0)
	var waited := not early.done
	_runner.call("request_action", "start_cold_daemon")
	await early.wait(TEXT_TIMEOUT)
	_report("life:cold_start", early.ok and waited and attempts, early.error_message, {
		"attempts_before_start": attempts,
		"waited": waited,
		"ok": early.ok,
		"finish_reason": early.finish_reason,
		"history": chat.history,
		"connected": _events["connected"],
		"reconnected": _events["reconnected"],
		"dropped": {"done": dropped.done, "ok": dropped.ok, "finish_reason": dropped.finish_reason,
				"error": dropped.error_code, "text": dropped.text},
	})
	chat.queue_free()
	return early.ok


func _check_restart(signal_name: String) -> void:
	var chat := _new_chat()
	var other := _new_chat()
	var before := await chat.ask("before")
	var disconnects_before: int = _events["disconnected"].size()
	var reconnects_before: int = _events["reconnected"]
	var streamed := [0]
	chat.response_updated.connect(func(_chunk: String) -> void: streamed[0] += 1)
	# One line streaming when the daemon goes (frozen first, so that it is surely unfinished), one
	# waiting behind it in the chat, and (before a kill) one request on the wire that the frozen
	# daemon never saw. After SIGCONT a SIGTERMed daemon may still take such a request up before
	# it stops, and whether it streamed first is then a race: that case is the kill's.
	chat.max_tokens = LONG_LINE
	chat.repetition_penalty = 5.0
	var in_flight := chat.ask_request("Tell me a very long story.")
	chat.max_tokens = 6
	chat.repetition_penalty = 1.0
	var waiting := chat.ask_request("after the restart")
	var streaming: bool = await _until(func() -> bool: return streamed[0] > 0, 60.0)
	_runner.call("request_action", "freeze_cold_daemon")
	var frozen := await _until_frozen(30.0)
	var streaming_when_frozen := streaming and not in_flight.done
	var unanswered: LoraloomRequest = null
	if signal_name == "KILL":
		unanswered = other.ask_request("Are you there?")
		await get_tree().create_timer(0.3).timeout
	var unanswered_waited := unanswered == null or not unanswered.done
	_runner.call("request_action", "restart_cold_daemon", {"signal": signal_name})
	await in_flight.wait(TEXT_TIMEOUT)
	var waited := not waiting.done
	await waiting.wait(TEXT_TIMEOUT)
	if unanswered != null:
		await unanswered.wait(TEXT_TIMEOUT)
	var history := chat.history
	_report("life:restart_" + signal_name.to_lower(), waiting.ok and frozen and waited,
			"%s / %s" % [in_flight.error_message, waiting.error_message], {
				"before": before,
				"frozen": frozen,
				"streaming_when_frozen": streaming_when_frozen,
				"in_flight": {"ok": in_flight.ok, "error": in_flight.error_code,
						"finish_reason": in_flight.finish_reason, "chunks": in_flight.chunk_count},
				"waited": waited,
				"waiting_ok": waiting.ok,
				"unanswered": {} if unanswered == null else {"waited": unanswered_waited,
						"ok": unanswered.ok, "error": unanswered.error_code},
				"history_users": history.filter(func(m: Dictionary) -> bool:
					return m["role"] == "user").map(func(m: Dictionary) -> String:
						return m["content"]),
				"disconnected": _events["disconnected"].slice(disconnects_before),
				"reconnected": _events["reconnected"] - reconnects_before,
			})
	chat.queue_free()
	other.queue_free()
