class_name LoraloomDiscovery
extends RefCounted
## Finds a running daemon through its runtime file, the way the Python client does.
##
## The daemon writes a small JSON file at start (url, host, port, token, pid, version, protocol)
## that only the user can read, and removes it on exit. Its location, in order:[br]
## 1. [code]$LORALOOM_RUNTIME_FILE[/code] when set;[br]
## 2. Windows: [code]%LOCALAPPDATA%\loraloom\daemon.json[/code];[br]
## 3. macOS: [code]~/Library/Application Support/loraloom/daemon.json[/code];[br]
## 4. elsewhere: [code]$XDG_RUNTIME_DIR/loraloom/daemon.json[/code], or
## [code]~/.local/state/loraloom/daemon.json[/code] when XDG_RUNTIME_DIR is unset.

## The keys [method read_runtime_file] requires, with the JSON type each must have.
const REQUIRED_KEYS := {"url": TYPE_STRING, "token": TYPE_STRING}


## The runtime file's path on this machine (empty on the web, which has no such file).
static func default_runtime_file() -> String:
	if OS.has_feature("web"):
		return ""
	var env := {}
	for key: String in ["LORALOOM_RUNTIME_FILE", "LOCALAPPDATA", "XDG_RUNTIME_DIR"]:
		if OS.has_environment(key):
			env[key] = OS.get_environment(key)
	var home := OS.get_environment("USERPROFILE" if OS.get_name() == "Windows" else "HOME")
	return runtime_file_for(OS.get_name(), env, home)


## The rule itself, free of the environment so that it can be checked on any platform.
## [param os_name] is what [method OS.get_name] returns; [param env] holds the variables that are
## set (empty values count as unset, as in the Python client).
static func runtime_file_for(os_name: String, env: Dictionary, home: String) -> String:
	var override: String = env.get("LORALOOM_RUNTIME_FILE", "")
	if not override.is_empty():
		return override
	var base: String
	if os_name == "Windows":
		base = env.get("LOCALAPPDATA", "")
		if base.is_empty():
			base = home.path_join("AppData").path_join("Local")
	elif os_name == "macOS":
		base = home.path_join("Library").path_join("Application Support")
	else:
		base = env.get("XDG_RUNTIME_DIR", "")
		if base.is_empty():
			base = home.path_join(".local").path_join("state")
	return base.path_join("loraloom").path_join("daemon.json")


## Reads a runtime file. Returns its fields (port, pid and protocol as [int]), or a dictionary
## with only an [code]"error"[/code] key saying why it could not be used.
static func read_runtime_file(path: String) -> Dictionary:
	if path.is_empty():
		return {"error": "no runtime file on this platform; set loraloom/connection/url"}
	if not FileAccess.file_exists(path):
		return {"error": "no daemon is running (no runtime file at %s)" % path}
	# JSON.parse() reports through its return value; JSON.parse_string() would also log an error.
	var json := JSON.new()
	var parsed := json.parse(FileAccess.get_file_as_string(path))
	var data: Variant = json.data
	if parsed != OK or typeof(data) != TYPE_DICTIONARY:
		return {"error": "the runtime file %s is not a JSON object" % path}
	for key: String in REQUIRED_KEYS:
		if typeof(data.get(key)) != REQUIRED_KEYS[key]:
			return {"error": "the runtime file %s has no valid '%s'" % [path, key]}
	var info := {"url": data["url"], "token": data["token"]}
	info["host"] = str(data.get("host", ""))
	info["version"] = str(data.get("version", ""))
	# JSON numbers arrive as floats in Godot; these are whole numbers on the wire.
	for key: String in ["port", "pid", "protocol"]:
		var number: Variant = data.get(key)
		info[key] = int(number) if typeof(number) in [TYPE_INT, TYPE_FLOAT] else -1
	return info
