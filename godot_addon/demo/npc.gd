extends VBoxContainer
## One NPC of the demo: a name, a speech bubble and the [LoraloomChat] that gives it a voice.

## The name shown above the speech.
@export var display_name: String = "NPC"

var _speech: Label
var _chat: LoraloomChat


func _ready() -> void:
	var title := Label.new()
	title.text = display_name
	add_child(title)
	_speech = Label.new()
	_speech.autowrap_mode = TextServer.AUTOWRAP_WORD_SMART
	_speech.custom_minimum_size = Vector2(280, 60)
	add_child(_speech)
	_chat = get_chat()
	_chat.response_updated.connect(_on_response_updated)
	_chat.request_failed.connect(_on_request_failed)


## The chat node that speaks for this NPC.
func get_chat() -> LoraloomChat:
	return get_node("Chat") as LoraloomChat


## Says something to the NPC; returns the line's request id.
func speak(line: String) -> String:
	_speech.text = ""
	return get_chat().ask_request(line).id


func _on_response_updated(chunk: String) -> void:
	_speech.text += chunk


func _on_request_failed(code: String, message: String) -> void:
	_speech.text = "(%s: %s)" % [code, message]
