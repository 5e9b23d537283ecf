class_name LoraloomFrames
extends RefCounted
## Builds protocol frames and checks them, from the schema in [LoraloomProtocol].
##
## [LoraloomProtocol] is generated from the daemon's own message models, so what this class builds
## and accepts follows the protocol without a field name, default or bound written twice.[br]
## [method build] gives a frame in the protocol's canonical form: [code]type[/code] first, then the
## fields in protocol order, defaults filled in, null values left out, integers given for float
## fields turned into floats. [method check] says why the daemon would refuse a frame with
## [code]bad_message[/code]: an unknown type or field, a missing field, a value of the wrong kind,
## out of its bounds, not one of the allowed strings or not matching its pattern, in nested parts
## too. Rules that tie several fields together (a [code]generate[/code] has either
## [code]prompt[/code] or [code]messages[/code]) are left to the daemon.
## [codeblock]
## var frame := LoraloomFrames.build(LoraloomProtocol.PING, {"id": "p-1"})
## assert(LoraloomFrames.check(frame).is_empty())
## [/codeblock]

# Compiled patterns, by their source.
static var _patterns: Dictionary = {}


## The frame of message [param type_name] with [param fields]: every field of the message in
## protocol order, from [param fields] or else its default; absent and null ones are left out.
## Fields the message does not have are kept, after the others, for [method check] to refuse.
static func build(type_name: String, fields: Dictionary = {}) -> Dictionary:
	var frame := {"type": type_name}
	_fill(frame, LoraloomProtocol.MESSAGES.get(type_name, {}), fields)
	return frame


## Why [param frame] is not a valid message, or an empty string when it is one.
static func check(frame: Dictionary) -> String:
	var type_name: Variant = frame.get("type")
	if typeof(type_name) != TYPE_STRING or not LoraloomProtocol.MESSAGES.has(type_name):
		return "unknown message type '%s'" % str(type_name)
	var problem := _check_fields(frame, LoraloomProtocol.MESSAGES[type_name], "")
	return "" if problem.is_empty() else "invalid '%s' message: %s" % [type_name, problem]


# ---------------------------------------------------------------- building


static func _fill(out: Dictionary, rules: Dictionary, fields: Dictionary) -> void:
	for key: String in rules:
		if out.has(key):
			continue
		var rule: Dictionary = rules[key]
		var value: Variant = fields[key] if fields.has(key) else _copy(rule.get("default"))
		if value != null:
			out[key] = _conform(value, rule)
	for key: Variant in fields:
		if not rules.has(key) and not out.has(key) and fields[key] != null:
			out[key] = fields[key]


## [param value] in the form its rule asks for: floats for float fields, arrays for lists and
## parts as canonical dictionaries; anything else unchanged, for [method check] to judge.
static func _conform(value: Variant, rule: Dictionary) -> Variant:
	match str(rule.get("kind")):
		"float":
			if typeof(value) == TYPE_INT:
				return float(value)
		"list":
			if _is_list(value):
				var items: Array = []
				for item: Variant in value:
					items.append(null if item == null else _conform(item, rule["item"]))
				return items
		"map":
			if typeof(value) == TYPE_DICTIONARY:
				var map := {}
				for key: Variant in value:
					map[key] = null if value[key] == null else _conform(value[key], rule["item"])
				return map
		"model":
			if typeof(value) == TYPE_DICTIONARY:
				var part := {}
				_fill(part, LoraloomProtocol.PARTS.get(rule["model"], {}), value)
				return part
	return value


static func _copy(value: Variant) -> Variant:
	# The schema's defaults are constants, read-only: frames get copies of them.
	if typeof(value) == TYPE_ARRAY or typeof(value) == TYPE_DICTIONARY:
		return value.duplicate(true)
	return value


static func _is_list(value: Variant) -> bool:
	return typeof(value) in [TYPE_ARRAY, TYPE_PACKED_STRING_ARRAY, TYPE_PACKED_INT32_ARRAY,
			TYPE_PACKED_INT64_ARRAY, TYPE_PACKED_FLOAT32_ARRAY, TYPE_PACKED_FLOAT64_ARRAY]


# ---------------------------------------------------------------- checking


static func _check_fields(map: Dictionary, rules: Dictionary, path: String) -> String:
	for key: Variant in map:
		if not rules.has(key):
			return "%s%s: unknown field" % [path, key]
	for key: String in rules:
		var rule: Dictionary = rules[key]
		if not map.has(key):
			if rule.get("required", false):
				return "%s%s: missing" % [path, key]
			continue
		var problem := _check_value(map[key], rule, path + key)
		if not problem.is_empty():
			return problem
	return ""


static func _check_value(value: Variant, rule: Dictionary, where: String) -> String:
	if value == null:
		return "" if rule.get("nullable", false) else where + ": must not be null"
	var problem := ""
	match str(rule.get("kind")):
		"str":
			problem = _check_str(value, rule)
		"int":
			problem = _check_number(value, rule, true)
		"float":
			problem = _check_number(value, rule, false)
		"bool":
			problem = "" if typeof(value) == TYPE_BOOL else "must be true or false"
		"bin":
			problem = "" if typeof(value) == TYPE_PACKED_BYTE_ARRAY else "must be bytes"
		"list":
			return _check_list(value, rule, where)
		"map":
			return _check_map(value, rule, where)
		"model":
			if typeof(value) != TYPE_DICTIONARY:
				problem = "must be a dictionary"
			else:
				return _check_fields(value, LoraloomProtocol.PARTS.get(rule["model"], {}), where + ".")
	return "" if problem.is_empty() else "%s: %s" % [where, problem]


static func _check_str(value: Variant, rule: Dictionary) -> String:
	if typeof(value) != TYPE_STRING and typeof(value) != TYPE_STRING_NAME:
		return "must be a string"
	var text := String(value)
	var allowed: Array = rule.get("values", [])
	if not allowed.is_empty() and not (text in allowed):
		return "must be one of %s" % ", ".join(PackedStringArray(allowed))
	var problem := _check_size(text.length(), rule, "characters")
	if problem.is_empty() and rule.has("pattern") and not _matches(text, rule["pattern"]):
		problem = "must match %s" % rule["pattern"]
	return problem


static func _check_number(value: Variant, rule: Dictionary, integer: bool) -> String:
	var kind := typeof(value)
	if kind != TYPE_INT and (integer or kind != TYPE_FLOAT):
		return "must be an integer" if integer else "must be a number"
	if kind == TYPE_FLOAT and not is_finite(value):
		return "must be finite"
	var problem := ""
	if rule.has("ge") and value < rule["ge"]:
		problem = "must be at least %s" % rule["ge"]
	elif rule.has("gt") and value <= rule["gt"]:
		problem = "must be more than %s" % rule["gt"]
	elif rule.has("le") and value > rule["le"]:
		problem = "must be at most %s" % rule["le"]
	elif rule.has("lt") and value >= rule["lt"]:
		problem = "must be less than %s" % rule["lt"]
	return problem


static func _check_size(size: int, rule: Dictionary, unit: String) -> String:
	if rule.has("min_length") and size < rule["min_length"]:
		return "must have at least %d %s" % [rule["min_length"], unit]
	if rule.has("max_length") and size > rule["max_length"]:
		return "must have at most %d %s" % [rule["max_length"], unit]
	return ""


static func _check_list(value: Variant, rule: Dictionary, where: String) -> String:
	if not _is_list(value):
		return where + ": must be a list"
	var problem := _check_size(value.size(), rule, "items")
	if not problem.is_empty():
		return "%s: %s" % [where, problem]
	for i in value.size():
		problem = _check_value(value[i], rule["item"], "%s[%d]" % [where, i])
		if not problem.is_empty():
			return problem
	return ""


static func _check_map(value: Variant, rule: Dictionary, where: String) -> String:
	if typeof(value) != TYPE_DICTIONARY:
		return where + ": must be a dictionary"
	var problem := _check_size(value.size(), rule, "entries")
	if not problem.is_empty():
		return "%s: %s" % [where, problem]
	for key: Variant in value:
		if typeof(key) != TYPE_STRING:
			return "%s: keys must be strings" % where
		problem = _check_value(value[key], rule["item"], "%s.%s" % [where, key])
		if not problem.is_empty():
			return problem
	return ""


static func _matches(text: String, pattern: String) -> bool:
	if not _patterns.has(pattern):
		# The daemon's regex engine matches a final `$` only at the very end of the text, PCRE
		# also before a final newline; PCRE's \z is the former.
		var source := pattern
		if pattern.ends_with("$") and not pattern.ends_with("\\$"):
			source = pattern.left(-1) + "\\z"
		_patterns[pattern] = RegEx.create_from_string(source)
	var regex: RegEx = _patterns[pattern]
	return regex.is_valid() and regex.search(text) != null
