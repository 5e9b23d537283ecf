class_name LoraloomClient
extends Node
## The connection to the loraloom daemon, registered by the plugin as the autoload
## [code]Loraloom[/code].
##
## It finds the daemon (project settings, or the runtime file the daemon writes), connects over a
## WebSocket, does the [code]hello[/code]/[code]welcome[/code] handshake, subscribes to adapter
## events and reconnects when the connection drops. Everything runs on the main thread: the socket
## is polled in [method Node._process], and signals are emitted from there.[br]
## Nodes such as [LoraloomChat] and [LoraloomImage] send their requests through it.[br]
## Life cycle: requests made while there is no connection (the daemon is still starting, or
## restarting) wait for it, up to [member request_connect_wait] seconds, then fail with
## [code]not_connected[/code]; failed attempts to connect keep them. When an established
## connection drops (the daemon stopped, said [code]shutting_down[/code], or was killed), the
## client reconnects with growing delays (re-reading the runtime file) and the waiting requests go
## out on the new connection, together with the text and image requests the daemon had said
## nothing about yet; those that had started streaming fail ([code]shutting_down[/code] or
## [code]connection_closed[/code]): their output was already seen.[br]
## GPU budget: with [code]loraloom/budget/enabled[/code] (off by default) the client sends the
## budget of Project Settings ([LoraloomBudget]) after every handshake, the first and each
## reconnection, and in frame sync reports each frame start from [method Node._process]
## ([member process_priority] is low, so that comes first in the frame), with the GPU time the
## renderer measured for the last frame where it measures one
## ([code]loraloom/budget/report_measured_gpu_time[/code], on by default).[br]
## Settings (Project Settings, under [code]loraloom/[/code]) are read once, in [method Node._ready];
## the matching properties can be changed before [method connect_to_daemon].[br]
## Its parts: the socket's life cycle is a [LoraloomConnection]'s, the bookkeeping of requests sent
## and waiting a [LoraloomOutbox]'s; starting and stopping the daemon's process is done here.

## Emitted after every successful handshake, the first and each reconnection; [param welcome] is
## the daemon's [code]welcome[/code].
signal connected(welcome: Dictionary)
## Emitted, after [signal connected], for every handshake that follows a dropped connection.
signal reconnected(welcome: Dictionary)
## Emitted when an established connection closed: the WebSocket close code (1001 when the daemon
## is shutting down) and the reason.
signal disconnected(code: int, reason: String)
## Emitted when an attempt to connect failed (no daemon, refused, bad token, timeout); attempts
## go on while [member auto_reconnect] is on or requests wait.
signal connection_failed(reason: String)
## Emitted when an adapter changed on disk and the daemon acted on it. [param event] is
## [code]added[/code], [code]updated[/code], [code]removed[/code] or [code]rejected[/code];
## [param adapter] is the daemon's AdapterInfo (name, kind, status, version, ...).
signal adapter_changed(adapter_name: String, event: String, adapter: Dictionary)
## Emitted when the whole adapter list was (re)loaded: after connecting, and after
## [method refresh_adapters].
signal adapters_updated(adapters: Dictionary)
## Emitted for every frame received, after it was handled; for tools and debugging.
signal message_received(message: Dictionary)
## Emitted when the daemon answered a budget this client sent (after each handshake with a
## budget set, and after [method set_budget]): the [code]budget[/code] in force now.
signal budget_changed(budget: Dictionary)

enum State { DISCONNECTED, CONNECTING, HANDSHAKING, READY }

## The protocol version this addon speaks.
const PROTOCOL_VERSION := LoraloomProtocol.VERSION
## The name the plugin gives the autoload; [method find] looks for it first.
const AUTOLOAD_NAME := "Loraloom"
const SETTING_PREFIX := "loraloom/"
## Project settings and their defaults; the editor plugin registers them.
const SETTINGS := {
	"connection/url": "",
	"connection/token": "",
	"connection/runtime_file": "",
	"connection/auto_connect": true,
	"connection/auto_reconnect": true,
	"connection/connect_timeout": 10.0,
	"connection/request_connect_wait": 30.0,
	"connection/client_name": "godot",
	"connection/max_frame_bytes": 16777216,
	"daemon/auto_start": false,
	"daemon/auto_start_shipped": true,
	"daemon/executable": "loraloom",
	"daemon/arguments": ["serve"],
	"daemon/stop_on_exit": true,
	"daemon/stop_grace": 10.0,
}
## What [method stop_daemon] runs in a detached [code]/bin/sh[/code]: SIGTERM to the pid ($1), up
## to $2 tenths of a second for it to exit (a zombie counts as gone), then SIGKILL, and then the
## runtime file ($3) is removed if it still names that pid (a killed daemon cannot remove it).
const STOP_SCRIPT := """pid="$1"; steps="$2"; file="$3"
alive() {
	if [ -d /proc/1 ]; then
		[ -r "/proc/$pid/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"
	else
		s=$(ps -o stat= -p "$pid" 2>/dev/null) && [ -n "$s" ] && [ "${s#Z}" = "$s" ]
	fi
}
kill -TERM "$pid" 2>/dev/null || exit 0
i=0
while alive; do
	i=$((i + 1))
	if [ "$i" -gt "$steps" ]; then
		kill -KILL "$pid" 2>/dev/null
		sleep 0.2
		if [ -n "$file" ] && grep -Eq '"pid": *'"$pid"'([^0-9]|$)' "$file" 2>/dev/null; then
			rm -f "$file"
		fi
		exit 0
	fi
	sleep 0.1
done
"""
## What [method start_daemon] leaves running beside a daemon it started, in a detached
## [code]/bin/sh[/code], so that a game that crashes or is killed does not leave its daemon
## running: it waits while both the game ($1) and the daemon ($3) run (a zombie counts as gone);
## when the game is gone first it runs [constant STOP_SCRIPT] ($2) on the daemon (SIGTERM, the
## grace period $4, then SIGKILL, and the runtime file $5). [method stop_daemon] ends it first.
const WATCH_SCRIPT := """game="$1"; stop="$2"; shift 2
alive() {
	if [ -d /proc/1 ]; then
		[ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"
	else
		s=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$s" ] && [ "${s#Z}" = "$s" ]
	fi
}
while alive "$game" && alive "$1"; do
	sleep 1
done
alive "$1" || exit 0
exec /bin/sh -c "$stop" loraloom-stop "$@"
"""

## Daemon URL ([code]ws://127.0.0.1:PORT[/code]); empty means "read the runtime file".
var url: String = ""
## Token for the handshake; empty means "read the runtime file".
var token: String = ""
## Runtime file to read; empty means the default location (see [LoraloomDiscovery]).
var runtime_file: String = ""
## Connect as soon as the node is ready.
var auto_connect: bool = true
## Reconnect (with growing delays, up to 10 s) after a failure or a dropped connection.
var auto_reconnect: bool = true
## Seconds one attempt to connect may take.
var connect_timeout: float = 10.0
## Seconds a request made while there is no connection waits for one before it fails with
## [code]not_connected[/code].
var request_connect_wait: float = 30.0
## The name the daemon logs for this client.
var client_name: String = "godot"
## Largest frame accepted; image results need room.
var max_frame_bytes: int = 16777216
## Start a local daemon with [member daemon_executable] when none is found. An exported game
## that carries the runtime ([LoraloomShipping]) starts it unless
## [code]loraloom/daemon/auto_start_shipped[/code] is off.
var auto_start_daemon: bool = false
## The program [method start_daemon] runs.
var daemon_executable: String = "loraloom"
## Its arguments.
var daemon_arguments: PackedStringArray = PackedStringArray(["serve"])
## Stop the daemon this node started when the node leaves the tree.
var stop_daemon_on_exit: bool = true
## Seconds a daemon stopped by [method stop_daemon] gets after SIGTERM before it is killed.
var daemon_stop_grace: float = 10.0
## Where the connection stands.
var state: State = State.DISCONNECTED
## The daemon's [code]welcome[/code] (models, limits); empty until connected.
var welcome: Dictionary = {}
## Adapters the daemon knows, by name (AdapterInfo dictionaries); kept current by its events.
var adapters: Dictionary = {}
## The pid of the daemon started by [method start_daemon], or -1.
var daemon_pid: int = -1
## Why the last attempt to connect failed; empty after a success.
var last_error: String = ""
## The GPU budget this client sends (from Project Settings; see [method set_budget]).
var budget := LoraloomBudget.new()
## The daemon's last answer to it ([code]budget[/code]); empty until one came.
var budget_in_force: Dictionary = {}
## Frame starts reported to the daemon (frame sync) since the game started.
var frames_sent: int = 0

var _outbox := LoraloomOutbox.new()
var _link := LoraloomConnection.new(self, _outbox)
var _watcher_pid: int = -1
var _measured_viewport := RID()


func _ready() -> void:
	process_mode = Node.PROCESS_MODE_ALWAYS
	url = _setting("connection/url")
	token = _setting("connection/token")
	runtime_file = _setting("connection/runtime_file")
	auto_connect = _setting("connection/auto_connect")
	auto_reconnect = _setting("connection/auto_reconnect")
	connect_timeout = _setting("connection/connect_timeout")
	request_connect_wait = _setting("connection/request_connect_wait")
	client_name = _setting("connection/client_name")
	max_frame_bytes = _setting("connection/max_frame_bytes")
	auto_start_daemon = _setting("daemon/auto_start")
	daemon_executable = _setting("daemon/executable")
	daemon_arguments = PackedStringArray(_setting("daemon/arguments"))
	stop_daemon_on_exit = _setting("daemon/stop_on_exit")
	daemon_stop_grace = _setting("daemon/stop_grace")
	budget = LoraloomBudget.from_project_settings(SETTING_PREFIX)
	if LoraloomShipping.carries_runtime(OS.has_feature("editor") or OS.has_feature("web"),
			OS.get_executable_path(), OS.get_name()):
		# Its own daemon, found through its own runtime file: never another game's.
		auto_start_daemon = auto_start_daemon or bool(_setting("daemon/auto_start_shipped"))
		if runtime_file.is_empty():
			runtime_file = LoraloomShipping.SHIPPED_RUNTIME_FILE
	# First in each frame's process pass: a frame start is reported when the frame starts.
	process_priority = -1000
	if auto_connect:
		connect_to_daemon()


func _exit_tree() -> void:
	disconnect_from_daemon()
	if stop_daemon_on_exit and daemon_pid > 0:
		stop_daemon()


func _process(_delta: float) -> void:
	if (state == State.READY and budget.reports_frames()
			and _link.send_frame_start(_measured_gpu_ms())):
		frames_sent += 1
	var now := LoraloomConnection.now()
	_link.poll(now)
	_outbox.expire(now, request_connect_wait, _fail_unconnected)


## The GPU time the renderer measured for the last frame of this node's viewport, in ms, or -1
## (not reported, or not measured: 0 from a renderer that cannot time the GPU).
func _measured_gpu_ms() -> float:
	if not budget.report_measured_gpu_time or get_viewport() == null:
		return -1.0
	var viewport := get_viewport().get_viewport_rid()
	if viewport != _measured_viewport:
		RenderingServer.viewport_set_measure_render_time(viewport, true)
		_measured_viewport = viewport
		return -1.0
	var ms := RenderingServer.viewport_get_measured_render_time_gpu(viewport)
	return ms if ms > 0.0 else -1.0


# ---------------------------------------------------------------- connection


## Connects to [param daemon_url] with [param daemon_token], or to [member url] and [member token],
## or, when those are empty, to the daemon named by the runtime file. The result arrives as
## [signal connected] or [signal connection_failed]. Requests in flight on a connection this
## replaces fail with [code]connection_closed[/code]; waiting ones go out on the new one.
func connect_to_daemon(daemon_url: String = "", daemon_token: String = "") -> void:
	if not daemon_url.is_empty():
		url = daemon_url
	if not daemon_token.is_empty():
		token = daemon_token
	var was_open := _link.is_open()
	var was_ready := state == State.READY
	_link.reopen()
	if was_open:
		# Requests sent on the old connection would never hear back on the new one. Failed after
		# the new attempt started, so that lines these failures send next wait for it.
		_outbox.fail_sent(LoraloomProtocol.ERROR_CONNECTION_CLOSED, "reconnecting to the daemon",
				auto_reconnect, LoraloomConnection.now())
		if was_ready:
			disconnected.emit(1000, "reconnecting")


## Closes the connection and stops reconnecting. Every request, sent or waiting, fails with
## [code]connection_closed[/code]. Safe to call at any time.
func disconnect_from_daemon() -> void:
	var was_ready := state == State.READY
	_link.close()
	_outbox.fail_all(LoraloomProtocol.ERROR_CONNECTION_CLOSED, "disconnected by the game")
	if was_ready:
		disconnected.emit(1000, "disconnected by the game")


## True when the handshake is done and requests go straight out (false once the daemon said it
## is shutting down).
func is_ready() -> bool:
	return state == State.READY and not _link.going_away


## Names of the adapters of [param kind] ([code]text[/code], [code]image[/code] or empty for
## all) whose status is [code]ready[/code], sorted.
func get_adapter_names(kind: String = "") -> PackedStringArray:
	var names := PackedStringArray()
	for adapter_name: String in adapters:
		var info: Dictionary = adapters[adapter_name]
		var usable: bool = info.get("status") == LoraloomProtocol.ADAPTER_STATUS_READY
		if usable and (kind.is_empty() or info.get("kind") == kind):
			names.append(adapter_name)
	names.sort()
	return names


## Starts the daemon as a child process and returns its pid, or -1 ([member last_error] and a
## warning say why; always -1 on the web, which cannot start processes). In an exported game that
## is the shipped runtime, [code]loraloom/runtime/loraloom serve --pack loraloom/pack[/code] next
## to the executable (see [LoraloomShipping]), publishing itself in its own runtime file
## ([constant LoraloomShipping.SHIPPED_RUNTIME_FILE] unless [member runtime_file] is set); in the
## editor [member daemon_executable] (looked up on PATH) with [member daemon_arguments]. With
## [member runtime_file] set, [code]--runtime-file[/code] is passed so it publishes itself there.
func start_daemon() -> int:
	if OS.has_feature("web") or daemon_executable.is_empty():
		return -1
	var plan := LoraloomShipping.launch_plan(OS.has_feature("editor"),
			LoraloomShipping.shipped_root(OS.get_executable_path()), OS.get_name(),
			daemon_executable, daemon_arguments, OS.get_environment("PATH"))
	if not plan["error"].is_empty():
		last_error = "cannot start the loraloom daemon: %s" % plan["error"]
		push_warning("loraloom: " + last_error)
		return -1
	if plan["source"] == "shipped" and runtime_file.is_empty():
		runtime_file = LoraloomShipping.SHIPPED_RUNTIME_FILE
	var arguments: PackedStringArray = plan["arguments"]
	if not runtime_file.is_empty() and not "--runtime-file" in arguments:
		DirAccess.make_dir_recursive_absolute(
				ProjectSettings.globalize_path(runtime_file).get_base_dir())
		arguments.append("--runtime-file")
		arguments.append(ProjectSettings.globalize_path(runtime_file))
	daemon_pid = OS.create_process(str(plan["executable"]), arguments)
	if daemon_pid < 0:
		last_error = "cannot start %s" % plan["executable"]
		push_warning("loraloom: " + last_error)
	elif OS.get_name() != "Windows":
		var watch := PackedStringArray(["-c", WATCH_SCRIPT, "loraloom-watch",
				str(OS.get_process_id()), STOP_SCRIPT])
		watch.append_array(_stop_arguments(daemon_pid))
		_watcher_pid = OS.create_process("/bin/sh", watch)
	return daemon_pid


## Stops the daemon [method start_daemon] started, without blocking the game: SIGTERM now (the
## daemon ends its requests, closes every connection and removes its runtime file), then a kill
## after [member daemon_stop_grace] seconds if it is still there, done by a small detached shell
## ([constant STOP_SCRIPT]) so that it also happens when the game is quitting. On Windows, which
## has no SIGTERM for it, the daemon is killed and its runtime file removed here.
func stop_daemon() -> void:
	var pid := daemon_pid
	daemon_pid = -1
	if pid <= 0 or OS.has_feature("web"):
		return
	if _watcher_pid > 0 and OS.is_process_running(_watcher_pid):
		OS.kill(_watcher_pid)  # the stop below does its work
	_watcher_pid = -1
	var arguments := _stop_arguments(pid)
	if OS.get_name() == "Windows":
		OS.kill(pid)
		var info := LoraloomDiscovery.read_runtime_file(arguments[2])
		if int(info.get("pid", -1)) == pid:
			DirAccess.remove_absolute(arguments[2])
		return
	var stop := PackedStringArray(["-c", STOP_SCRIPT, "loraloom-stop"])
	stop.append_array(arguments)
	OS.create_process("/bin/sh", stop)


## [constant STOP_SCRIPT]'s arguments for the daemon [param pid]: the pid, the grace period in
## tenths of a second, the runtime file.
func _stop_arguments(pid: int) -> PackedStringArray:
	var path := runtime_file
	if path.is_empty():
		path = LoraloomDiscovery.default_runtime_file()
	var steps := maxi(1, int(daemon_stop_grace * 10.0))
	return PackedStringArray([str(pid), str(steps), ProjectSettings.globalize_path(path)])


# ---------------------------------------------------------------- requests


## A request id unique on this client.
func new_id() -> String:
	return _outbox.new_id()


## Sends a request frame ([param message] must have a [code]type[/code]; an [code]id[/code] is
## added when missing) and returns its [LoraloomRequest]. The frame is built and checked with
## [LoraloomFrames]: defaults are filled in, and a frame the daemon would refuse fails with
## [code]bad_message[/code] without being sent. Failures, even immediate ones, arrive on the
## request after this returns, so its signals can be connected first. With [param request] (made
## earlier with an id from [method new_id]), that object carries the request and its id is used.
func send_request(message: Dictionary, request: LoraloomRequest = null) -> LoraloomRequest:
	request = _outbox.prepare(message, request, cancel, new_id)
	if not _outbox.admit(request):
		return request
	request.finished.connect(_on_request_finished)
	if is_ready():
		_link.send(request.message)
	elif _link.is_open() or _link.is_retrying():
		_outbox.hold(request, LoraloomConnection.now())
	else:
		request.fail.call_deferred(LoraloomRequest.ERROR_NOT_CONNECTED,
				"not connected to the daemon")
	return request


## Asks the daemon to stop the request [param request_id]; it then ends with its result
## (finish reason [code]cancelled[/code]). A request still waiting for the connection ends the
## same way at once, without being sent.
func cancel(request_id: String) -> void:
	var request := _outbox.find(request_id)
	if request == null or request.done:
		return
	if _outbox.release(request):
		request.handle_event(LoraloomOutbox.cancelled_result(request))
		return
	if is_ready():
		_link.send(LoraloomFrames.build(LoraloomProtocol.CANCEL, {"id": request_id}))


## Asks for the adapter list again; [signal adapters_updated] follows.
func refresh_adapters() -> LoraloomRequest:
	return send_request({"type": LoraloomProtocol.LIST_ADAPTERS})


## Sends a [code]ping[/code]; the request's result is the [code]pong[/code].
func ping() -> LoraloomRequest:
	return send_request({"type": LoraloomProtocol.PING})


## Makes [param new_budget] this client's budget: sent now when connected (a disabled or empty
## one clears the budget this connection set) and after every later handshake. Returns the
## request (its result is the [code]budget[/code] in force, also in [signal budget_changed]), or
## null when not connected (it goes out on connecting).
func set_budget(new_budget: LoraloomBudget) -> LoraloomRequest:
	budget = new_budget
	return _link.send_budget(true) if is_ready() else null


## The game's client: the autoload (named [constant AUTOLOAD_NAME] by the plugin, or any other
## [LoraloomClient] that is a child of the root); null when there is none.
static func find(from: Node = null) -> LoraloomClient:
	var tree: SceneTree = null
	if from != null and from.is_inside_tree():
		tree = from.get_tree()
	else:
		tree = Engine.get_main_loop() as SceneTree
	if tree == null:
		return null
	var named := tree.root.get_node_or_null(NodePath(AUTOLOAD_NAME)) as LoraloomClient
	if named != null:
		return named
	for child: Node in tree.root.get_children():
		if child is LoraloomClient:
			return child
	return null


# ---------------------------------------------------------------- plumbing


func _setting(key: String) -> Variant:
	return ProjectSettings.get_setting(SETTING_PREFIX + key, SETTINGS[key])


func _on_request_finished(request: LoraloomRequest) -> void:
	if not _outbox.forget(request) and is_ready() and LoraloomOutbox.abandoned(request):
		# Given up on here (a caller's timeout, a freed node) while the daemon may still work on it.
		_link.send(LoraloomFrames.build(LoraloomProtocol.CANCEL, {"id": request.id}))


func _fail_unconnected(request: LoraloomRequest) -> void:
	request.fail(LoraloomRequest.ERROR_NOT_CONNECTED,
			"no connection to the daemon within %.0f s: %s" % [request_connect_wait, last_error])
