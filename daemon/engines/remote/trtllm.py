"""TensorRT-LLM's OpenAI server (`trtllm-serve`, PyTorch backend with a `lora_config`), from its
documentation and source (unverified here: TensorRT-LLM needs an NVIDIA GPU).

It has no endpoint to load or unload adapters: each request names its adapter in
`lora_request: {"lora_name", "lora_int_id", "lora_path"}` and the server loads it from that
path into its own LoRA cache, keyed by `lora_int_id`. So loading is a no-op here, ids are
derived from the versioned name (which holds the content hash: one id, one content, never
reused for other weights), and a retired version's files are deleted once no request uses it.
Its request model forbids unknown fields, so no `return_token_ids` (chunks are counted).
Every sampling value of the protocol maps.
"""

from __future__ import annotations

from typing import Any

from .dialect import Dialect, RemoteAdapter

__all__ = ["TrtllmDialect"]


class TrtllmDialect(Dialect):
    name = "trtllm"
    token_ids_field = None
    load_path = None
    unload_path = None

    def model_field(self, base: str, adapter: RemoteAdapter | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": base}
        if adapter is not None:
            fields["lora_request"] = {"lora_name": adapter.name, "lora_int_id": adapter.int_id,
                                      "lora_path": adapter.path}
        return fields
