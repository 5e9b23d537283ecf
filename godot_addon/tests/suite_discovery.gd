extends Node
## The runtime-file rule and reader, checked against the Python client's answers.


## Runs the suite, reporting through [param runner].
func run(runner: Node) -> void:
	var cases: Array = runner.get("config").get("discovery_cases", [])
	var mismatches := PackedStringArray()
	for item: Variant in cases:
		var got := LoraloomDiscovery.runtime_file_for(item["os"], item["env"], item["home"])
		if got != item["expected"]:
			mismatches.append("%s %s: got %s, expected %s" % [
				item["os"], item["env"], got, item["expected"]])
	runner.call("report", "discovery:rule", mismatches.is_empty() and not cases.is_empty(),
			"; ".join(mismatches), {"cases": cases.size()})
	_check_reader(runner)


func _check_reader(runner: Node) -> void:
	var path := "user://discovery_test.json"
	var info := {"url": "ws://127.0.0.1:1234", "host": "127.0.0.1", "port": 1234,
			"token": "s3cret", "pid": 42, "version": "0.1.0", "protocol": 1}
	_write(path, JSON.stringify(info))
	var read := LoraloomDiscovery.read_runtime_file(path)
	var good: bool = read.get("url") == info["url"] and read.get("token") == info["token"] \
			and typeof(read.get("port")) == TYPE_INT and read.get("port") == 1234 \
			and read.get("pid") == 42 and read.get("protocol") == 1
	_write(path, "{\"url\": 5}")
	var malformed := LoraloomDiscovery.read_runtime_file(path).has("error")
	_write(path, "not json")
	var not_json := LoraloomDiscovery.read_runtime_file(path).has("error")
	DirAccess.remove_absolute(path)
	var missing := LoraloomDiscovery.read_runtime_file(path).has("error")
	runner.call("report", "discovery:read", good and malformed and not_json and missing,
			"read %s" % read, {"good": good, "malformed_refused": malformed,
			"not_json_refused": not_json, "missing_refused": missing})


func _write(path: String, text: String) -> void:
	var file := FileAccess.open(path, FileAccess.WRITE)
	if file != null:
		file.store_string(text)
		file.close()
