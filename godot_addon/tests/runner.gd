extends Node
## Runs the addon's GDScript suites in a real Godot runtime and prints one line per result.
##
## pytest (tests/godot/) packs this project, serves it to Godot's web export in headless chromium
## and reads the lines back. This script references no addon class on purpose: a broken addon
## script must show up as a failed result, not keep the runner itself from loading.[br]
## Lines: [code]LORALOOM_TEST {json}[/code] per result, [code]LORALOOM_ACTION {json}[/code] when
## the suite needs pytest to do something (edit the adapter folder; read the daemon's /healthz;
## start, freeze, stop or restart the life-cycle suite's daemon), and
## [code]LORALOOM_DONE {json}[/code] at the end. Release builds ignore assert(), so every check
## is an explicit comparison and every wait has a timeout.

const SUITES := [
	"res://tests/suite_codec.gd",
	"res://tests/suite_protocol.gd",
	"res://tests/suite_discovery.gd",
	"res://tests/suite_shipping.gd",
	"res://tests/suite_daemon.gd",
	"res://tests/suite_structured.gd",
	"res://tests/suite_budget.gd",
	"res://tests/suite_life.gd",
]

## The configuration pytest wrote (config.json beside the page).
var config: Dictionary = {}

var _count: int = 0
var _failed: int = 0


func _ready() -> void:
	config = _read_config()
	print("LORALOOM_START ", JSON.stringify({"engine": Engine.get_version_info().string}))
	_load_scripts(config.get("scripts", []))
	for path: String in SUITES:
		var script := load(path) as GDScript
		if script == null or not script.can_instantiate():
			report("suite:" + path.get_file(), false, "the suite script does not load")
			continue
		var suite: Node = script.new()
		add_child(suite)
		await suite.call("run", self)
		suite.queue_free()
	print("LORALOOM_DONE ", JSON.stringify({"count": _count, "failed": _failed}))


## Prints one result; [param data] carries what pytest asserts on.
func report(test_name: String, ok: bool, detail: String = "", data: Dictionary = {}) -> void:
	_count += 1
	if not ok:
		_failed += 1
	var line := {"name": test_name, "ok": ok, "detail": detail, "data": data}
	print("LORALOOM_TEST ", JSON.stringify(line))


## Asks pytest to perform [param action] (it reads the line as it is printed).
func request_action(action: String, args: Dictionary = {}) -> void:
	var line := args.duplicate()
	line["action"] = action
	print("LORALOOM_ACTION ", JSON.stringify(line))


func _read_config() -> Dictionary:
	var text := ""
	if OS.has_feature("web"):
		text = str(JavaScriptBridge.eval("window.loraloomTestConfig || ''", true))
	else:
		# On a desktop Godot: godot --path godot_addon res://tests/runner.tscn -- CONFIG.json
		var args := OS.get_cmdline_user_args()
		if not args.is_empty():
			text = FileAccess.get_file_as_string(args[0])
	var data: Variant = JSON.parse_string(text) if not text.is_empty() else null
	if typeof(data) != TYPE_DICTIONARY:
		printerr("loraloom tests: no readable configuration")
		return {}
	return data


func _load_scripts(paths: Array) -> void:
	for path: Variant in paths:
		var script := load(str(path)) as Script
		var ok := script != null and script.can_instantiate()
		report("load:" + str(path), ok, "" if ok else "the script does not compile")
