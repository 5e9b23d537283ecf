@tool
extends EditorExportPlugin
## Adds the loraloom runtime and the game pack to a desktop export, next to the executable:
## [code]<export folder>/loraloom/runtime/[/code] and [code].../loraloom/pack/[/code], copied from
## [code]loraloom/shipping/runtime_folder[/code] and [code]loraloom/shipping/pack_folder[/code].
##
## Not inside the .pck: a program cannot be started from inside an archive, and the daemon reads
## its model and adapters as ordinary files (see [LoraloomShipping]). Web, Android and iOS exports
## get nothing (they cannot start processes). Editor only; the file list and the copy are
## [LoraloomShipping]'s, which the test suite runs in the real runtime.

var _target_dir: String = ""
var _files: Array[Dictionary] = []


func _get_name() -> String:
	return "loraloom"


func _export_begin(features: PackedStringArray, _is_debug: bool, path: String,
		_flags: int) -> void:
	_target_dir = ""
	_files.clear()
	if not bool(_setting("shipping/export_runtime")):
		return
	var refusal := LoraloomShipping.export_refusal(features)
	if not refusal.is_empty():
		print("loraloom: %s" % refusal)
		return
	var runtime_folder := ProjectSettings.globalize_path(str(_setting("shipping/runtime_folder")))
	var pack_folder := ProjectSettings.globalize_path(str(_setting("shipping/pack_folder")))
	var os_name := _target_os(features)
	var problems := LoraloomShipping.check_folders(runtime_folder, pack_folder, os_name)
	if not problems.is_empty():
		# The export goes on (the game may reach a daemon the player runs); it is said loudly.
		push_warning("loraloom: the export gets no runtime: " + "; ".join(problems))
		return
	_target_dir = LoraloomShipping.export_dir(ProjectSettings.globalize_path(path))
	_files = LoraloomShipping.export_files(runtime_folder, pack_folder)


func _export_end() -> void:
	if _target_dir.is_empty():
		return
	var problems := LoraloomShipping.copy_files(_files, _target_dir)
	if problems.is_empty():
		print("loraloom: added %d files under %s" % [
				_files.size(), _target_dir.path_join(LoraloomShipping.FOLDER)])
	else:
		push_error("loraloom: the runtime was not fully added: " + "; ".join(problems))
	_target_dir = ""
	_files.clear()


func _setting(key: String) -> Variant:
	return ProjectSettings.get_setting("loraloom/" + key, LoraloomShipping.SETTINGS[key])


func _target_os(features: PackedStringArray) -> String:
	if "windows" in features:
		return "Windows"
	if "macos" in features:
		return "macOS"
	return "Linux"
