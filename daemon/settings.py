"""All daemon settings in one pydantic-settings model.

Sources, strongest first: command-line options, environment variables (`LORALOOM_PORT=0`;
lists comma-separated, `LORALOOM_TEXT_ADAPTERS=./a,./b`, or as JSON), a TOML file
(`--config FILE`, or `$LORALOOM_CONFIG`), the defaults below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORALOOM_", extra="forbid", validate_default=True)

    # -- network and security
    host: str = "127.0.0.1"
    port: int = Field(default=7341, ge=0, le=65535)  # 0 picks a free port
    token: str | None = None  # generated at start when unset
    allowed_origins: Annotated[list[str], NoDecode] = []  # browser Origins allowed to connect ("*" = any; avoid)
    runtime_file: Path | None = None  # default: bridge.discovery.default_runtime_file()

    # -- models
    text_model: str = "default"  # a Hugging Face folder, "default" (embedded SmolLM2) or "none"
    image_model: str = "default"  # a diffusers folder, "default" (a placeholder that draws noise) or "none"
    cache_dir: Path | None = None  # default: $LORALOOM_CACHE_DIR or ~/.cache/loraloom
    device: str = "auto"
    dtype: str = "auto"

    # -- adapters
    text_adapters: Annotated[list[Path], NoDecode] = []
    image_adapters: Annotated[list[Path], NoDecode] = []
    watch: bool = True  # reload adapters when their files change
    reload_debounce_ms: int = Field(default=200, ge=0)
    pinned_adapters: Annotated[list[str], NoDecode] = []
    adapter_capacity: int | None = Field(default=64, ge=1)  # adapters kept in host memory (None: all)

    # -- text engine capacity
    max_seqs: int = Field(default=16, ge=1)
    max_context: int = Field(default=2048, ge=16)
    kv_cache_mb: int | None = None
    lora_slots: int = Field(default=16, ge=1)
    max_lora_rank: int = Field(default=64, ge=1)
    prefill_chunk: int = Field(default=256, ge=1)
    kernels: bool = True  # compiled kernels where installed (Triton on CUDA, numba on the CPU); false: PyTorch ops

    # -- image engine capacity
    image_max_batch: int = Field(default=4, ge=1)  # images per call; every call runs at this size (1: lowest latency)

    # -- limits
    max_frame_bytes: int = Field(default=1 << 20, ge=1024)
    max_inflight_per_connection: int = Field(default=64, ge=1)
    max_prompt_tokens: int | None = None  # default: the context length minus one
    max_new_tokens: int = Field(default=4096, ge=1)
    max_adapters_per_request: int = Field(default=4, ge=1)

    # -- logging
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("text_adapters", "image_adapters", "allowed_origins", "pinned_adapters", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # Environment variables hold lists as JSON ('["a", "b"]') or comma-separated ("a,b").
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("LORALOOM_CONFIG")
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)
