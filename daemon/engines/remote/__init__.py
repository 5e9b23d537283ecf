"""The remote text engine: vLLM, SGLang or trtllm-serve behind loraloom's engine contract.

`engine.py` (the contract, one streamed HTTP request per generation), `adapters.py` (versioned
names, the shared folder, mixes, unloading), `mix.py` (a mix as one LoRA; PEFT folders),
`dialect.py` (what the three servers share) with `vllm.py`, `sglang.py`, `trtllm.py` (where
each differs), `http.py` (JSON and server-sent events over the standard library).
"""

from __future__ import annotations

from .engine import DIALECTS, RemoteConfig, RemoteEngine

__all__ = ["DIALECTS", "RemoteConfig", "RemoteEngine"]
