extends Node
## A sample NPC that acts, not just talks: the gate guard picks one of the game's actions for
## what the player did, and the game carries it out.
##
## The reply is constrained to the action names ([method LoraloomChat.ask_choice]), so it is
## always one of them: no parsing, no "I'm not sure" to handle. The same works with an enum in a
## JSON Schema when the action needs arguments (see quest_giver.gd for a schema).

## Emitted when the guard acted: the action's name (a key of [constant ACTIONS]).
signal acted(action: String)

## What the guard can do, and what the game does for each.
const ACTIONS := {
	"open_gate": "The guard swings the gate open.",
	"keep_shut": "The guard crosses his arms. The gate stays shut.",
	"ask_bribe": "The guard rubs two fingers together.",
	"call_captain": "The guard shouts for the captain.",
}

## The last thing the game showed for the guard's action (a UI label would show it).
var last_outcome: String = ""

@onready var _chat: LoraloomChat = $Chat


## The guard's chat node (its adapter, persona and sampling settings).
func get_chat() -> LoraloomChat:
	return _chat


## The guard decides what to do about [param event] and does it; returns the action's name, or
## an empty string when the line failed (the chat's request_failed says why).
func react(event: String) -> String:
	var action := await _chat.ask_choice(event, PackedStringArray(ACTIONS.keys()))
	if action.is_empty():
		return ""
	last_outcome = ACTIONS[action]
	acted.emit(action)
	return action
