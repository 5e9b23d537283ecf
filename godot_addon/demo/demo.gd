extends VBoxContainer
## The demo: one line goes to every NPC at once; each answers through its own adapter, and the
## daemon batches the three requests into the same forward passes.

@onready var _prompt: LineEdit = $Prompt
@onready var _status: Label = $Status


func _ready() -> void:
	($Speak as Button).pressed.connect(speak_all)
	var client := get_node_or_null("/root/Loraloom") as LoraloomClient
	if client != null:
		client.connected.connect(_on_connected)
		client.connection_failed.connect(_on_connection_failed)


## The NPCs of the scene.
func get_npcs() -> Array[Node]:
	return $NPCs.get_children()


## Every NPC answers the prompt at once; returns the request ids.
func speak_all() -> PackedStringArray:
	var ids := PackedStringArray()
	for npc: Node in get_npcs():
		ids.append(npc.call("speak", _prompt.text))
	return ids


func _on_connected(welcome: Dictionary) -> void:
	var model: Variant = welcome.get("text_model")
	_status.text = "Connected to loraloom %s (%s)" % [
		welcome.get("server"), model.get("name") if model is Dictionary else "no text model"]


func _on_connection_failed(reason: String) -> void:
	_status.text = "No daemon: %s (start one with `loraloom serve`)" % reason
