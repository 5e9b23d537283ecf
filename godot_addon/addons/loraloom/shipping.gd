class_name LoraloomShipping
extends RefCounted
## Where a shipped game keeps the loraloom runtime and its game pack, what the export adds, and
## what the autoload launches.
##
## An exported desktop game carries two folders next to its executable:
## [code]<folder of the executable>/loraloom/runtime/[/code] (what [code]loraloom bundle[/code]
## wrote: the executable [code]loraloom[/code], [code]loraloom.exe[/code] on Windows, and its
## libraries) and [code].../loraloom/pack/[/code] (what [code]loraloom pack[/code] wrote: the
## model, the adapters, [code]manifest.json[/code]). They stay outside the .pck: an operating
## system can only start a program that is a file of its own, and the daemon reads its model with
## ordinary file access, not Godot's; copying gigabytes out of the .pck at every start would
## double the disk space and the start time.[br]
## The export plugin ([code]export_plugin.gd[/code], editor only) copies the folders set in
## [constant SETTINGS] with [method export_files] and [method copy_files]. In an exported game the
## autoload launches [code]runtime/loraloom serve --pack <pack>[/code] ([method launch_plan]); in
## the editor it runs the developer's [code]loraloom[/code] (on PATH, or
## [code]loraloom/daemon/executable[/code]). Everything here is plain logic on paths, so it is
## tested in the real runtime without an editor.

## The folder next to the exported executable.
const FOLDER := "loraloom"
const RUNTIME_FOLDER := "runtime"
const PACK_FOLDER := "pack"
## The runtime file a game that starts its own runtime uses when none is set, so that it finds
## its own daemon and not another game's.
const SHIPPED_RUNTIME_FILE := "user://loraloom/daemon.json"
## Project settings and their defaults (under [code]loraloom/[/code]).
const SETTINGS := {
	"shipping/runtime_folder": "",
	"shipping/pack_folder": "",
	"shipping/export_runtime": true,
}
## Export platforms that cannot start a process: the runtime is not added to them.
const NO_PROCESS_FEATURES := ["web", "android", "ios"]


## The shipped folder of a game whose executable is [param executable_path].
static func shipped_root(executable_path: String) -> String:
	return executable_path.get_base_dir().path_join(FOLDER)


## Whether a game whose executable is [param executable_path] carries the runtime: an exported
## game ([param in_editor_or_web] false) with the runtime's executable beside it.
static func carries_runtime(in_editor_or_web: bool, executable_path: String,
		os_name: String) -> bool:
	return not in_editor_or_web and FileAccess.file_exists(
			runtime_executable(shipped_root(executable_path), os_name))


## The runtime's executable file name on [param os_name] (as [method OS.get_name] says it).
static func executable_name(os_name: String) -> String:
	return "loraloom.exe" if os_name == "Windows" else "loraloom"


## The runtime's executable under [param root].
static func runtime_executable(root: String, os_name: String) -> String:
	return root.path_join(RUNTIME_FOLDER).path_join(executable_name(os_name))


## The game pack under [param root].
static func pack_dir(root: String) -> String:
	return root.path_join(PACK_FOLDER)


## What to start: [code]{"executable", "arguments", "source", "error"}[/code]. In an exported game
## ([param in_editor] false) the runtime under [param root] with [code]--pack[/code] added to
## [param arguments]; in the editor [param developer_executable] (a name looked up in
## [param path_env], the PATH, or a path). [code]error[/code] says what is missing, else is empty.
static func launch_plan(in_editor: bool, root: String, os_name: String,
		developer_executable: String, arguments: PackedStringArray,
		path_env: String) -> Dictionary:
	var args := arguments.duplicate()
	if not in_editor:
		var executable := runtime_executable(root, os_name)
		var pack := pack_dir(root)
		var plan := {"executable": executable, "arguments": args, "source": "shipped", "error": ""}
		if not FileAccess.file_exists(executable):
			plan["error"] = ("no loraloom runtime at %s: export the game with the loraloom " +
					"plugin enabled and loraloom/shipping/runtime_folder set") % executable
		elif not FileAccess.file_exists(pack.path_join("manifest.json")):
			plan["error"] = ("no game pack at %s (no manifest.json): set " +
					"loraloom/shipping/pack_folder to what `loraloom pack` wrote") % pack
		elif not "--pack" in args:
			args.append("--pack")
			args.append(pack)
		return plan
	var found := find_program(developer_executable, path_env, os_name)
	var plan := {"executable": found, "arguments": args, "source": "developer", "error": ""}
	if found.is_empty():
		plan["executable"] = developer_executable
		plan["error"] = ("'%s' is not on PATH: install loraloom (pip install loraloom) or " +
				"set loraloom/daemon/executable") % developer_executable
	return plan


## [param program] as a path that exists: itself when it names a file, else the first match in
## the folders of [param path_env] (with [code].exe[/code] tried on Windows); empty when none.
static func find_program(program: String, path_env: String, os_name: String) -> String:
	if program.is_empty():
		return ""
	var windows := os_name == "Windows"
	if program.is_absolute_path() or "/" in program or (windows and "\\" in program):
		return program if FileAccess.file_exists(program) else ""
	var names := [program]
	if windows and not program.to_lower().ends_with(".exe"):
		names.push_front(program + ".exe")  # what Windows would run first
	for folder: String in path_env.split(";" if windows else ":", false):
		for candidate: String in names:
			var path := folder.path_join(candidate)
			if FileAccess.file_exists(path):
				return path
	return ""


## Where an export to [param export_path] puts [constant FOLDER]: beside the executable, which in
## a macOS [code].app[/code] is [code]Contents/MacOS[/code].
static func export_dir(export_path: String) -> String:
	if export_path.get_extension().to_lower() == "app":
		return export_path.path_join("Contents").path_join("MacOS")
	return export_path.get_base_dir()


## Why the export for [param features] gets no runtime, or an empty string when it gets one.
static func export_refusal(features: PackedStringArray) -> String:
	for feature: String in NO_PROCESS_FEATURES:
		if feature in features:
			return "%s exports cannot start processes: the loraloom runtime is not added" % feature
	return ""


## The files an export adds, each [code]{"source": absolute path, "target": path under the
## export's folder}[/code], from [param runtime_folder] and [param pack_folder] (hidden files
## too: a bundle's libraries may be), sorted by target. Missing folders give none: see
## [method check_folders].
static func export_files(runtime_folder: String, pack_folder: String) -> Array[Dictionary]:
	var files: Array[Dictionary] = []
	for pair: Array in [[runtime_folder, RUNTIME_FOLDER], [pack_folder, PACK_FOLDER]]:
		var source := str(pair[0])
		if source.is_empty() or not DirAccess.dir_exists_absolute(source):
			continue
		for relative: String in list_tree(source):
			files.append({"source": source.path_join(relative),
					"target": FOLDER.path_join(str(pair[1])).path_join(relative)})
	files.sort_custom(func(a: Dictionary, b: Dictionary) -> bool: return a["target"] < b["target"])
	return files


## What is wrong with the configured folders for an export on [param os_name], one sentence
## each; empty when they hold a runtime and a pack.
static func check_folders(runtime_folder: String, pack_folder: String, os_name: String) -> Array:
	var problems := []
	if runtime_folder.is_empty():
		problems.append("loraloom/shipping/runtime_folder is not set (the folder " +
				"`loraloom bundle --out DIR` wrote)")
	elif not FileAccess.file_exists(runtime_folder.path_join(executable_name(os_name))):
		problems.append("%s has no %s: build it with `loraloom bundle --out %s`" % [
				runtime_folder, executable_name(os_name), runtime_folder])
	if pack_folder.is_empty():
		problems.append("loraloom/shipping/pack_folder is not set (the folder " +
				"`loraloom pack --out PACK` wrote)")
	elif not FileAccess.file_exists(pack_folder.path_join("manifest.json")):
		problems.append("%s has no manifest.json: build it with `loraloom pack`" % pack_folder)
	return problems


## Every file under [param folder], as paths relative to it, hidden ones included.
static func list_tree(folder: String) -> PackedStringArray:
	var found := PackedStringArray()
	var dir := DirAccess.open(folder)
	if dir == null:
		return found
	dir.include_hidden = true
	for name: String in dir.get_files():
		found.append(name)
	for sub: String in dir.get_directories():
		for relative: String in list_tree(folder.path_join(sub)):
			found.append(sub.path_join(relative))
	return found


## Copies [param files] (from [method export_files]) under [param target_dir], after removing
## what an earlier export left in its runtime and pack folders (versions must not mix), keeping
## each file's Unix permissions (the runtime must stay executable). Returns the problems, empty
## when every file was copied.
static func copy_files(files: Array[Dictionary], target_dir: String) -> Array:
	var problems := []
	for sub: String in [RUNTIME_FOLDER, PACK_FOLDER]:
		remove_tree(target_dir.path_join(FOLDER).path_join(sub))
	for file: Dictionary in files:
		var destination := target_dir.path_join(str(file["target"]))
		var made := DirAccess.make_dir_recursive_absolute(destination.get_base_dir())
		var mode := FileAccess.get_unix_permissions(str(file["source"]))
		var err := made if made != OK else DirAccess.copy_absolute(
				str(file["source"]), destination, mode if mode > 0 else -1)
		if err != OK:
			problems.append("cannot copy %s to %s: %s" % [file["source"], destination,
					error_string(err)])
	return problems


## Removes [param folder] and everything in it (nothing when it does not exist).
static func remove_tree(folder: String) -> void:
	var dir := DirAccess.open(folder)
	if dir == null:
		return
	dir.include_hidden = true
	for name: String in dir.get_files():
		DirAccess.remove_absolute(folder.path_join(name))
	for sub: String in dir.get_directories():
		if dir.is_link(sub):
			DirAccess.remove_absolute(folder.path_join(sub))  # the link, never what it points to
		else:
			remove_tree(folder.path_join(sub))
	DirAccess.remove_absolute(folder)
