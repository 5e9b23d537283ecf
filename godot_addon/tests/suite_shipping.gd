extends "res://tests/suite_base.gd"
## Shipping a game with loraloom, the part the web runtime can run: where the runtime and the pack
## go next to an exported executable, what the autoload would launch (exported and in the editor,
## with what is missing said clearly), the export's file list and its copy on real folders (in
## user://), and that the web build starts nothing. The export plugin itself (an
## EditorExportPlugin) exists only in the editor; it calls the functions checked here.
##
## pytest passes the file layout to build (config "shipping") and checks the answers against the
## placement the shipping contract gives.

var _config: Dictionary
var _base: String


## Runs the suite, reporting through [param runner].
func run(runner: Node) -> void:
	_runner = runner
	_config = runner.get("config").get("shipping", {})
	if _config.is_empty():
		_report("shipping:configured", false, "pytest gave no shipping configuration")
		return
	_base = ProjectSettings.globalize_path("user://shipping-test")
	LoraloomShipping.remove_tree(_base)
	_check_paths()
	_check_launch_plan()
	_check_export_files()
	_check_web_starts_nothing()
	LoraloomShipping.remove_tree(_base)


func _write(path: String, text: String) -> bool:
	DirAccess.make_dir_recursive_absolute(path.get_base_dir())
	var file := FileAccess.open(path, FileAccess.WRITE)
	if file == null:
		return false
	file.store_string(text)
	file.close()
	return true


func _check_paths() -> void:
	var cases: Array = []
	for exe: String in _config.get("executables", []):
		var root := LoraloomShipping.shipped_root(exe)
		cases.append({
			"executable": exe,
			"root": root,
			"runtime_linux": LoraloomShipping.runtime_executable(root, "Linux"),
			"runtime_windows": LoraloomShipping.runtime_executable(root, "Windows"),
			"runtime_macos": LoraloomShipping.runtime_executable(root, "macOS"),
			"pack": LoraloomShipping.pack_dir(root),
		})
	var exports: Dictionary = {}
	for path: String in _config.get("export_paths", []):
		exports[path] = LoraloomShipping.export_dir(path)
	var refusals := {}
	for features: Array in _config.get("export_features", []):
		refusals[",".join(PackedStringArray(features))] = LoraloomShipping.export_refusal(
				PackedStringArray(features))
	_report("shipping:paths", not cases.is_empty(), "", {
		"cases": cases, "export_dirs": exports, "refusals": refusals})


func _check_launch_plan() -> void:
	var root := _base.path_join("game/loraloom")
	var exe := _base.path_join("game/quest.x86_64")
	var bin := _base.path_join("bin")
	var args := PackedStringArray(["serve", "--port", "0"])
	var plans := {}
	plans["exported_missing_runtime"] = LoraloomShipping.launch_plan(false, root, "Linux", "loraloom",
			args, "")
	var made := _write(root.path_join("runtime/loraloom"), "#!/bin/sh\n")
	plans["exported_missing_pack"] = LoraloomShipping.launch_plan(false, root, "Linux", "loraloom",
			args, "")
	made = made and _write(root.path_join("pack/manifest.json"), "{}")
	plans["exported"] = LoraloomShipping.launch_plan(false, root, "Linux", "loraloom", args, "")
	plans["exported_pack_given"] = LoraloomShipping.launch_plan(false, root, "Linux", "loraloom",
			PackedStringArray(["serve", "--pack", "/elsewhere"]), "")
	plans["editor_not_on_path"] = LoraloomShipping.launch_plan(true, root, "Linux", "loraloom",
			args, "/nowhere:" + _base.path_join("empty"))
	made = made and _write(bin.path_join("loraloom"), "#!/bin/sh\n")
	plans["editor_on_path"] = LoraloomShipping.launch_plan(true, root, "Linux", "loraloom", args,
			"/nowhere:" + bin)
	plans["editor_configured_path"] = LoraloomShipping.launch_plan(true, root, "Linux",
			bin.path_join("loraloom"), args, "")
	made = made and _write(bin.path_join("loraloom.exe"), "MZ")
	plans["editor_windows_exe"] = LoraloomShipping.launch_plan(true, root, "Windows", "loraloom",
			args, "C:/nowhere;" + bin)
	var carries := {
		"exported": LoraloomShipping.carries_runtime(false, exe, "Linux"),
		"editor": LoraloomShipping.carries_runtime(true, exe, "Linux"),
		"elsewhere": LoraloomShipping.carries_runtime(false, _base.path_join("x/quest"), "Linux"),
	}
	_report("shipping:launch_plan", made, "", {
		"plans": plans, "root": root, "bin": bin, "carries_runtime": carries})


func _check_export_files() -> void:
	var runtime := _base.path_join("built/runtime")
	var pack := _base.path_join("built/pack")
	var made := true
	for relative: String in _config.get("runtime_files", []):
		made = made and _write(runtime.path_join(relative), "runtime:" + relative)
	for relative: String in _config.get("pack_files", []):
		made = made and _write(pack.path_join(relative), "pack:" + relative)
	var problems := {
		"unset": LoraloomShipping.check_folders("", "", "Linux"),
		"windows_bundle_missing": LoraloomShipping.check_folders(runtime, pack, "Windows"),
		"no_manifest": LoraloomShipping.check_folders(runtime, runtime, "Linux"),
		"ready": LoraloomShipping.check_folders(runtime, pack, "Linux"),
	}
	var files := LoraloomShipping.export_files(runtime, pack)
	var target := _base.path_join("export")
	# What an earlier export left: removed, so that two runtime versions never mix.
	var stale := target.path_join("loraloom/runtime/stale.so")
	made = made and _write(stale, "old")
	var copy_problems := LoraloomShipping.copy_files(files, target)
	var copied := {}
	for relative: String in LoraloomShipping.list_tree(target):
		copied[relative] = FileAccess.get_file_as_string(target.path_join(relative))
	_report("shipping:export_files", made and copy_problems.is_empty(), "%s" % [copy_problems], {
		"files": files.map(func(f: Dictionary) -> Array: return [
			str(f["source"]).trim_prefix(_base + "/"), f["target"]]),
		"copied": copied,
		"problems": problems,
		"stale_left": FileAccess.file_exists(stale),
		"export_none": LoraloomShipping.export_files("", _base.path_join("missing")).size(),
	})


func _check_web_starts_nothing() -> void:
	var client := LoraloomClient.new()
	client.auto_connect = false
	add_child(client)
	var pid := client.start_daemon()
	_report("shipping:web_starts_nothing", pid == -1, "", {
		"pid": pid, "web": OS.has_feature("web"), "editor": OS.has_feature("editor"),
		"daemon_pid": client.daemon_pid})
	client.queue_free()
