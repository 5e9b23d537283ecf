@tool
extends EditorPlugin
## Editor side of loraloom: the [code]Loraloom[/code] autoload, the project settings, a dock
## that shows what the running game's connection sees, and the export plugin that puts the
## runtime and the game pack next to an exported game's executable.
##
## Editor-only: nothing here exists in an exported game, which only needs the autoload script.

const AUTOLOAD_NAME := "Loraloom"
const AUTOLOAD_PATH := "res://addons/loraloom/loraloom_client.gd"
const DockScript := preload("res://addons/loraloom/dock.gd")
const DebuggerScript := preload("res://addons/loraloom/debugger_plugin.gd")
const ExportScript := preload("res://addons/loraloom/export_plugin.gd")

var _dock: Control
var _debugger: EditorDebuggerPlugin
var _export: EditorExportPlugin


func _enable_plugin() -> void:
	if not ProjectSettings.has_setting("autoload/" + AUTOLOAD_NAME):
		add_autoload_singleton(AUTOLOAD_NAME, AUTOLOAD_PATH)


func _disable_plugin() -> void:
	if ProjectSettings.has_setting("autoload/" + AUTOLOAD_NAME):
		remove_autoload_singleton(AUTOLOAD_NAME)


func _enter_tree() -> void:
	_register_settings()
	_dock = DockScript.new()
	_dock.name = "Loraloom"
	add_control_to_dock(DOCK_SLOT_RIGHT_UL, _dock)
	_debugger = DebuggerScript.new()
	_debugger.set("dock", _dock)
	add_debugger_plugin(_debugger)
	_export = ExportScript.new()
	add_export_plugin(_export)


func _exit_tree() -> void:
	if _export != null:
		remove_export_plugin(_export)
		_export = null
	if _debugger != null:
		remove_debugger_plugin(_debugger)
		_debugger = null
	if _dock != null:
		remove_control_from_docks(_dock)
		_dock.queue_free()
		_dock = null


func _register_settings() -> void:
	# Registered each session so they show in Project Settings; only changed values are saved.
	var settings := LoraloomClient.SETTINGS.duplicate()
	settings.merge(LoraloomBudget.SETTINGS)
	settings.merge(LoraloomShipping.SETTINGS)
	for key: String in settings:
		var setting_name: String = LoraloomClient.SETTING_PREFIX + key
		var default: Variant = settings[key]
		if not ProjectSettings.has_setting(setting_name):
			ProjectSettings.set_setting(setting_name, default)
		ProjectSettings.set_initial_value(setting_name, default)
		ProjectSettings.set_as_basic(setting_name, true)
		var info := {"name": setting_name, "type": typeof(default)}
		if key == "connection/token":
			info["hint"] = PROPERTY_HINT_PASSWORD
		elif key == "connection/runtime_file":
			info["hint"] = PROPERTY_HINT_GLOBAL_FILE
			info["hint_string"] = "*.json"
		elif key in ["shipping/runtime_folder", "shipping/pack_folder"]:
			info["hint"] = PROPERTY_HINT_GLOBAL_DIR
		elif key == "budget/duty_cap":
			info["hint"] = PROPERTY_HINT_RANGE
			info["hint_string"] = "0,1,0.01"
		ProjectSettings.add_property_info(info)
