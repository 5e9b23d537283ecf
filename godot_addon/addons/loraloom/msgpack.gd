class_name LoraloomMsgpack
extends RefCounted
## Encodes and decodes msgpack, the format of every frame the daemon speaks.
##
## Godot has no msgpack codec, so the addon carries this one. Encoding is canonical as the
## protocol defines it (bridge/PROTOCOL.md), which keeps frames byte-identical to the Python
## reference: integers in their smallest form, floats as float64, strings as str, bytes as bin,
## maps in insertion order.[br]
## Types map as: [code]null[/code] - nil, [bool], [int], [float] - float64,
## [String] and [StringName] - str, [PackedByteArray] - bin, [Array] and the other packed arrays -
## array, [Dictionary] - map. Decoding gives them back ([PackedByteArray] for bin, [Array] for
## arrays); float32 decodes as [float]; extension types are refused.[br]
## One instance is not meant for use from several threads at once.

## Deepest nesting [method decode] accepts, so that a hostile frame cannot exhaust the stack.
const MAX_DEPTH := 64

## Why the last [method encode] or [method decode] failed; empty after a success.
var error: String = ""

var _out: StreamPeerBuffer
var _in: StreamPeerBuffer


## Returns the msgpack bytes of [param value], or an empty array with [member error] set.
func encode(value: Variant) -> PackedByteArray:
	error = ""
	_out = StreamPeerBuffer.new()
	_out.big_endian = true
	_write(value, 0)
	var bytes: PackedByteArray = _out.data_array
	_out = null
	if not error.is_empty():
		return PackedByteArray()
	return bytes


## Returns the value held by [param data] (exactly one msgpack object), or [code]null[/code] with
## [member error] set. Check [member error], since nil is also a valid value.
func decode(data: PackedByteArray) -> Variant:
	error = ""
	_in = StreamPeerBuffer.new()
	_in.big_endian = true
	_in.data_array = data
	var value: Variant = _read(0)
	if error.is_empty() and _in.get_available_bytes() > 0:
		_fail("%d trailing bytes after the value" % _in.get_available_bytes())
	_in = null
	if not error.is_empty():
		return null
	return value


func _fail(reason: String) -> void:
	# The first failure is the meaningful one; later ones are consequences.
	if error.is_empty():
		error = reason


# ---------------------------------------------------------------- encoding


func _write(value: Variant, depth: int) -> void:
	if depth > MAX_DEPTH:
		_fail("value nested deeper than %d levels" % MAX_DEPTH)
		return
	match typeof(value):
		TYPE_NIL:
			_out.put_u8(0xc0)
		TYPE_BOOL:
			_out.put_u8(0xc3 if value else 0xc2)
		TYPE_INT:
			_write_int(value)
		TYPE_FLOAT:
			_out.put_u8(0xcb)
			_out.put_double(value)
		TYPE_STRING, TYPE_STRING_NAME:
			_write_str(String(value))
		TYPE_PACKED_BYTE_ARRAY:
			_write_bin(value)
		TYPE_DICTIONARY:
			_write_map(value, depth)
		TYPE_ARRAY, TYPE_PACKED_STRING_ARRAY, TYPE_PACKED_INT32_ARRAY, TYPE_PACKED_INT64_ARRAY, \
		TYPE_PACKED_FLOAT32_ARRAY, TYPE_PACKED_FLOAT64_ARRAY:
			_write_array(value, depth)
		_:
			_fail("cannot encode a value of type %s" % type_string(typeof(value)))


func _write_int(n: int) -> void:
	# msgpack-python's choice, which the golden frames record: unsigned forms for n >= 0.
	if n >= 0:
		if n < 0x80:
			_out.put_u8(n)
		elif n <= 0xff:
			_out.put_u8(0xcc)
			_out.put_u8(n)
		elif n <= 0xffff:
			_out.put_u8(0xcd)
			_out.put_u16(n)
		elif n <= 0xffffffff:
			_out.put_u8(0xce)
			_out.put_u32(n)
		else:
			_out.put_u8(0xcf)
			_out.put_u64(n)
	elif n >= -32:
		_out.put_8(n)
	elif n >= -0x80:
		_out.put_u8(0xd0)
		_out.put_8(n)
	elif n >= -0x8000:
		_out.put_u8(0xd1)
		_out.put_16(n)
	elif n >= -0x80000000:
		_out.put_u8(0xd2)
		_out.put_32(n)
	else:
		_out.put_u8(0xd3)
		_out.put_64(n)


func _write_length(n: int, fix_base: int, fix_max: int, tag8: int, tag16: int, tag32: int) -> void:
	if n <= fix_max and fix_base >= 0:
		_out.put_u8(fix_base | n)
	elif n <= 0xff and tag8 >= 0:
		_out.put_u8(tag8)
		_out.put_u8(n)
	elif n <= 0xffff:
		_out.put_u8(tag16)
		_out.put_u16(n)
	elif n <= 0xffffffff:
		_out.put_u8(tag32)
		_out.put_u32(n)
	else:
		_fail("length %d does not fit msgpack" % n)


func _write_str(text: String) -> void:
	var bytes := text.to_utf8_buffer()
	_write_length(bytes.size(), 0xa0, 31, 0xd9, 0xda, 0xdb)
	_out.put_data(bytes)


func _write_bin(bytes: PackedByteArray) -> void:
	_write_length(bytes.size(), -1, -1, 0xc4, 0xc5, 0xc6)
	_out.put_data(bytes)


func _write_array(items: Variant, depth: int) -> void:
	var count: int = items.size()
	_write_length(count, 0x90, 15, -1, 0xdc, 0xdd)
	for item: Variant in items:
		_write(item, depth + 1)


func _write_map(map: Dictionary, depth: int) -> void:
	_write_length(map.size(), 0x80, 15, -1, 0xde, 0xdf)
	for key: Variant in map:
		_write(key, depth + 1)
		_write(map[key], depth + 1)


# ---------------------------------------------------------------- decoding


func _need(count: int) -> bool:
	if count < 0 or _in.get_available_bytes() < count:
		_fail("truncated: %d more bytes needed at offset %d" % [count, _in.get_position()])
		return false
	return true


func _read(depth: int) -> Variant:
	if depth > MAX_DEPTH:
		_fail("value nested deeper than %d levels" % MAX_DEPTH)
	if not error.is_empty() or not _need(1):
		return null
	var tag := _in.get_u8()
	if tag <= 0x7f or tag >= 0xe0:
		return tag if tag <= 0x7f else tag - 0x100
	if tag <= 0x8f:
		return _read_map(tag & 0x0f, depth)
	if tag <= 0x9f:
		return _read_array(tag & 0x0f, depth)
	if tag <= 0xbf:
		return _read_str(tag & 0x1f)
	return _read_tagged(tag, depth)


func _read_tagged(tag: int, depth: int) -> Variant:
	var value: Variant = null
	match tag:
		0xc0:
			value = null
		0xc2, 0xc3:
			value = tag == 0xc3
		0xc4, 0xc5, 0xc6:
			value = _read_bin(_read_length(tag - 0xc4))
		0xca:
			value = _in.get_float() if _need(4) else null
		0xcb:
			value = _in.get_double() if _need(8) else null
		0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd1, 0xd2, 0xd3:
			value = _read_int(tag)
		0xd9, 0xda, 0xdb:
			value = _read_str(_read_length(tag - 0xd9))
		0xdc, 0xdd:
			value = _read_array(_read_length(tag - 0xdc + 1), depth)
		0xde, 0xdf:
			value = _read_map(_read_length(tag - 0xde + 1), depth)
		_:
			_fail("unsupported msgpack tag 0x%02x" % tag)
	return value


## Reads a length of 1, 2 or 4 bytes ([param width_index] 0, 1, 2); -1 when truncated.
func _read_length(width_index: int) -> int:
	var width: int = [1, 2, 4][width_index]
	if not _need(width):
		return -1
	match width:
		1:
			return _in.get_u8()
		2:
			return _in.get_u16()
	return _in.get_u32()


func _read_int(tag: int) -> Variant:
	var widths := {0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8}
	if not _need(widths[tag]):
		return null
	var value: int = 0
	match tag:
		0xcc:
			value = _in.get_u8()
		0xcd:
			value = _in.get_u16()
		0xce:
			value = _in.get_u32()
		0xcf:
			value = _in.get_u64()
			# Godot's int is signed 64-bit: a larger uint64 would silently turn negative.
			if value < 0:
				_fail("uint64 %s does not fit an int" % String.num_uint64(value))
				return null
		0xd0:
			value = _in.get_8()
		0xd1:
			value = _in.get_16()
		0xd2:
			value = _in.get_32()
		0xd3:
			value = _in.get_64()
	return value


func _read_str(size: int) -> Variant:
	if size < 0 or not _need(size):
		return null
	var bytes := _read_bytes(size)
	return bytes.get_string_from_utf8()


func _read_bin(size: int) -> Variant:
	if size < 0 or not _need(size):
		return null
	return _read_bytes(size)


func _read_bytes(size: int) -> PackedByteArray:
	if size == 0:
		return PackedByteArray()
	var got: Array = _in.get_data(size)
	if got[0] != OK:
		_fail("cannot read %d bytes" % size)
		return PackedByteArray()
	return got[1]


func _read_array(count: int, depth: int) -> Variant:
	# Every element takes at least one byte: a count beyond that is a lie, refused before allocating.
	if count < 0 or not _need(count):
		return null
	var items: Array = []
	for i in count:
		items.append(_read(depth + 1))
		if not error.is_empty():
			return null
	return items


func _read_map(count: int, depth: int) -> Variant:
	if count < 0 or not _need(count * 2):
		return null
	var map := {}
	for i in count:
		var key: Variant = _read(depth + 1)
		var value: Variant = _read(depth + 1)
		if not error.is_empty():
			return null
		map[key] = value
	return map
