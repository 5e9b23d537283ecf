class_name LoraloomImage
extends LoraloomRequester
## Image generation on the daemon's diffusion model, through one image adapter (optional).
##
## The built-in image model of the daemon is a placeholder that draws noise; point the daemon at
## a real diffusers folder for real pictures. [code]welcome.image_model[/code] of the autoload
## tells which one is loaded (null when none).
## [codeblock]
## $Painter.image_ready.connect(func(_id: String, texture: Texture2D) -> void:
##     $Portrait.texture = texture)
## $Painter.generate("a lighthouse at dusk, oil painting")
## [/codeblock]

## Emitted after each denoising step; [param step] counts from 1 to [param total].
signal image_progress(request_id: String, step: int, total: int)
## Emitted for each finished image of a request (once, unless [member count] is above 1).
signal image_ready(request_id: String, texture: ImageTexture)
## Emitted when a request failed; [param code] is the protocol's error code or a client-side one
## ([code]not_connected[/code], [code]connection_closed[/code], [code]timeout[/code]).
signal request_failed(request_id: String, code: String, message: String)

## The daemon sent image bytes that are not a PNG.
const ERROR_BAD_IMAGE := LoraloomProtocol.ERROR_BAD_IMAGE
# The protocol's defaults, as constants so that the inspector shows them.
const _DEFAULTS := LoraloomProtocol.GENERATE_IMAGE_DEFAULTS
const _ADAPTER_DEFAULTS := LoraloomProtocol.ADAPTER_REF_DEFAULTS

## The image adapter (a folder in the daemon's image adapter folder); empty uses the base model.
@export var adapter: String = ""
## How strongly the adapter applies.
@export_range(-8.0, 8.0, 0.05) var adapter_scale: float = _ADAPTER_DEFAULTS["scale"]
## What the image should not show.
@export_multiline var negative_prompt: String = ""
## Image width in pixels (multiples of 8).
@export_range(8, 2048, 8) var width: int = _DEFAULTS["width"]
## Image height in pixels (multiples of 8).
@export_range(8, 2048, 8) var height: int = _DEFAULTS["height"]
## Denoising steps: more is slower and usually better.
@export_range(1, 200) var steps: int = _DEFAULTS["steps"]
## How closely to follow the prompt (classifier-free guidance).
@export_range(0.0, 50.0, 0.1) var guidance: float = _DEFAULTS["guidance"]
## How many images one request makes.
@export_range(1, 8) var count: int = _DEFAULTS["count"]
## Seed for repeatable images; -1 picks a new one each time.
@export var random_seed: int = -1

## The textures of the last finished request.
var textures: Array[ImageTexture] = []


## Starts an image for [param prompt] and returns the request id.
func generate(prompt: String) -> String:
	return _send(build_request(prompt)).id


## The [code]generate_image[/code] frame [method generate] sends (without its id).
func build_request(prompt: String) -> Dictionary:
	return LoraloomFrames.build(LoraloomProtocol.GENERATE_IMAGE, {
		"prompt": prompt,
		"negative_prompt": null if negative_prompt.is_empty() else negative_prompt,
		"adapters": [] if adapter.is_empty() else [{"name": adapter, "scale": adapter_scale}],
		"width": width,
		"height": height,
		"steps": steps,
		"guidance": guidance,
		"seed": random_seed if random_seed >= 0 else null,
		"count": count,
	})


## Waits for [param request_id] to end (at most [param timeout_s] seconds) and returns its
## [LoraloomRequest]; its [member LoraloomRequest.result] holds the PNG bytes.
func wait(request_id: String, timeout_s: float = 120.0) -> LoraloomRequest:
	return await super(request_id, timeout_s)


## Turns PNG bytes into a texture; null when they are not a PNG.
static func texture_from_png(png: PackedByteArray) -> ImageTexture:
	var picture := Image.new()
	if picture.load_png_from_buffer(png) != OK:
		return null
	return ImageTexture.create_from_image(picture)


func _on_event(request: LoraloomRequest, event: Dictionary) -> void:
	if event.get("type") == LoraloomProtocol.IMAGE_PROGRESS:
		image_progress.emit(request.id, int(event.get("step", 0)), int(event.get("total", 0)))


func _on_finished(request: LoraloomRequest) -> void:
	_forget_finished(16)
	if not request.ok:
		request_failed.emit(request.id, request.error_code, request.error_message)
		return
	textures.clear()
	for png: Variant in request.result.get("images", []):
		var texture: ImageTexture = null
		if typeof(png) == TYPE_PACKED_BYTE_ARRAY:
			texture = texture_from_png(png)
		if texture == null:
			request_failed.emit(request.id, ERROR_BAD_IMAGE, "the daemon sent an image that is not a PNG")
			return
		textures.append(texture)
	for texture: ImageTexture in textures:
		image_ready.emit(request.id, texture)
