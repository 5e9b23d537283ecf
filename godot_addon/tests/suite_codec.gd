extends Node
## The msgpack codec against the protocol's golden frames: decoding gives the frame's JSON value
## (types included), and encoding that value gives the golden bytes exactly.

const FIXTURES := "res://tests/fixtures/"


## Runs the suite, reporting through [param runner].
func run(runner: Node) -> void:
	var cases: Array = runner.get("config").get("codec_cases", [])
	for case_name: Variant in cases:
		_check_case(runner, str(case_name))
	_check_malformed(runner, runner.get("config").get("malformed_cases", []))


func _check_case(runner: Node, case_name: String) -> void:
	var codec := LoraloomMsgpack.new()
	var bytes := FileAccess.get_file_as_bytes(FIXTURES + case_name + ".msgpack")
	var typed: Variant = JSON.parse_string(
		FileAccess.get_file_as_string(FIXTURES + case_name + ".typed.json"))
	if bytes.is_empty() or typed == null:
		runner.call("report", "codec:" + case_name, false, "fixture missing from the pack")
		return
	var expected: Variant = from_typed(typed)
	var decoded: Variant = codec.decode(bytes)
	var decode_error := codec.error
	var same := same_value(decoded, expected)
	var reencoded := codec.encode(decoded)
	var encoded := codec.encode(expected)
	var detail := ""
	if not decode_error.is_empty():
		detail = "decode failed: " + decode_error
	elif not same:
		detail = "decoded %s, expected %s" % [describe(decoded), describe(expected)]
	elif reencoded != bytes:
		detail = "re-encoding differs: %s vs %s" % [reencoded.hex_encode(), bytes.hex_encode()]
	elif encoded != bytes:
		detail = "encoding the JSON value differs: %s vs %s" % [
			encoded.hex_encode(), bytes.hex_encode()]
	runner.call("report", "codec:" + case_name, detail.is_empty(), detail,
			{"bytes": bytes.size(), "reencoded": reencoded.hex_encode()})


func _check_malformed(runner: Node, cases: Array) -> void:
	# Every strict prefix of a frame is truncated, and one extra byte is trailing garbage.
	var codec := LoraloomMsgpack.new()
	var refused := 0
	var accepted := PackedStringArray()
	for case_name: Variant in cases:
		var bytes := FileAccess.get_file_as_bytes(FIXTURES + str(case_name) + ".msgpack")
		var variants: Array[PackedByteArray] = []
		for cut in range(0, bytes.size()):
			variants.append(bytes.slice(0, cut))
		var longer := bytes.duplicate()
		longer.append(0xc0)
		variants.append(longer)
		for variant: PackedByteArray in variants:
			codec.decode(variant)
			if codec.error.is_empty():
				accepted.append("%s[%d]" % [case_name, variant.size()])
			else:
				refused += 1
	var nested := PackedByteArray()
	for i in 200:
		nested.append(0x91)
	nested.append(0xc0)
	codec.decode(nested)
	var deep_refused := not codec.error.is_empty()
	codec.encode({"node": Node})
	var odd_refused := not codec.error.is_empty()
	var ok := accepted.is_empty() and deep_refused and odd_refused and refused > 0
	runner.call("report", "codec:malformed", ok, "accepted: %s" % ", ".join(accepted),
			{"refused": refused, "deep_refused": deep_refused, "odd_refused": odd_refused})


## Turns pytest's typed JSON into the Variant it stands for: {"$int": [high, low]},
## {"$float": [high, low]} (the float64's bits), {"$bin": base64} and
## {"$map": [[key, value], ...]} keep what plain JSON would lose. Integers travel as a signed
## high and an unsigned low 32-bit half, since JSON numbers reach Godot as doubles.
static func from_typed(value: Variant) -> Variant:
	if typeof(value) == TYPE_ARRAY:
		var items: Array = []
		for item: Variant in value:
			items.append(from_typed(item))
		return items
	if typeof(value) != TYPE_DICTIONARY:
		return value
	if value.has("$int"):
		return _join_halves(value["$int"])
	if value.has("$float"):
		var raw := PackedByteArray()
		raw.resize(8)
		raw.encode_s64(0, _join_halves(value["$float"]))
		return raw.decode_double(0)
	if value.has("$bin"):
		return Marshalls.base64_to_raw(str(value["$bin"]))
	var map := {}
	for pair: Variant in value.get("$map", []):
		map[from_typed(pair[0])] = from_typed(pair[1])
	return map


static func _join_halves(halves: Array) -> int:
	return (int(halves[0]) << 32) | int(halves[1])


## Deep equality that also requires the same types and the same key order.
static func same_value(a: Variant, b: Variant) -> bool:
	if typeof(a) != typeof(b):
		return false
	match typeof(a):
		TYPE_ARRAY:
			if a.size() != b.size():
				return false
			for i in a.size():
				if not same_value(a[i], b[i]):
					return false
			return true
		TYPE_DICTIONARY:
			if a.keys().size() != b.keys().size() or not same_value(a.keys(), b.keys()):
				return false
			for key: Variant in a:
				if not same_value(a[key], b[key]):
					return false
			return true
		TYPE_FLOAT:
			return a == b or (is_nan(a) and is_nan(b))
	return a == b


## A short description of a value with its types, for failure messages.
static func describe(value: Variant) -> String:
	return "%s:%s" % [type_string(typeof(value)), str(value).left(300)]
