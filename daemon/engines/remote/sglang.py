"""SGLang's server (`python -m sglang.launch_server --enable-lora`), from its documentation and
source (unverified here: SGLang does not install on this CPU machine).

An adapter is chosen with the OpenAI API's `model: "base:adapter"`. Adapters are loaded at run
time with `POST /load_lora_adapter {"lora_name", "lora_path"}` (answer: `{"success",
"error_message", "loaded_adapters"}`, 400 on failure) and unloaded with `/unload_lora_adapter`.
Start it with `--max-lora-rank` and `--lora-target-modules` large enough for the mixes you use.
`top_k` off is -1; `repetition_penalty` is refused above 2 (SGLang's own bound); `seed` is its
`sampling_seed`, which only makes runs reproducible with `--enable-deterministic-inference`;
`--enable-cache-report` makes it report cached prompt tokens.
"""

from __future__ import annotations

from typing import Any

from .dialect import Dialect, RemoteAdapter

__all__ = ["SglangDialect"]


class SglangDialect(Dialect):
    name = "sglang"
    top_k_off = -1
    limits = {"repetition_penalty": (2.0, "SGLang checks 0 <= repetition_penalty <= 2")}
    load_path = "/load_lora_adapter"
    unload_path = "/unload_lora_adapter"

    def model_field(self, base: str, adapter: RemoteAdapter | None) -> dict[str, Any]:
        return {"model": f"{base}:{adapter.name}" if adapter else base}
