extends Node
## A sample quest giver: asks the model for a quest as data the game can use directly (title,
## reward, items to fetch, urgency), through a JSON Schema.
##
## The daemon constrains every token to the schema, so [method offer_quest] returns a
## [Dictionary] with exactly these fields and bounds, or [code]{}[/code] when the line failed.
## Bounded strings and arrays keep the reply short enough for [member LoraloomChat.max_tokens].

## Emitted with each quest offered.
signal quest_offered(quest: Dictionary)

## What a quest is, for the model and for the game.
const QUEST_SCHEMA := {
	"type": "object",
	"additionalProperties": false,
	"required": ["title", "reward", "items", "urgent"],
	"properties": {
		"title": {"type": "string", "minLength": 1, "maxLength": 16},
		"reward": {"type": "integer", "minimum": 5, "maximum": 250},
		"items": {
			"type": "array",
			"minItems": 1,
			"maxItems": 2,
			"items": {"enum": ["herbs", "wolf pelt", "iron ore", "lost ring"]},
		},
		"urgent": {"type": "boolean"},
	},
}

@onready var _chat: LoraloomChat = $Chat


## The quest giver's chat node.
func get_chat() -> LoraloomChat:
	return _chat


## Asks for a quest for [param hero]; returns it ([code]{}[/code] when the line failed).
func offer_quest(hero: String) -> Dictionary:
	var quest := await _chat.ask_json("%s asks for work. Offer a quest." % hero, QUEST_SCHEMA)
	if not quest.is_empty():
		quest_offered.emit(quest)
	return quest
