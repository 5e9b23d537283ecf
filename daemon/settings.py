"""All daemon settings in one pydantic-settings model: each one's name, type, default, bounds and meaning.

Sources, strongest first: command-line options, environment variables (`LORALOOM_PORT=0`;
lists comma-separated, `LORALOOM_TEXT_ADAPTERS=./a,./b`, or as JSON), a TOML file
(`--config FILE`, or `$LORALOOM_CONFIG`), the defaults below.

A field's `description` and its group (`GROUP_STARTS`) are the only place a setting is explained:
`loraloom serve`'s options are built from them (daemon/cli.py), and so is README.md's
Configuration table:

    python -m daemon.settings --readme   # rewrite the table
    python -m daemon.settings --check    # exit 1 when it is stale (the test suite checks it too)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bridge.messages import MAX_ADAPTERS

__all__ = ["FLAG_NAMES", "GROUP_STARTS", "Settings", "default_text", "flag", "groups", "load_settings",
           "readme_table", "update_readme"]


class Settings(BaseSettings):
    """Fields come in groups, in this order; `GROUP_STARTS` names the first field of each."""

    model_config = SettingsConfigDict(env_prefix="LORALOOM_", extra="forbid", validate_default=True)

    host: str = Field(default="127.0.0.1", description="interface to listen on; anything but loopback logs a warning")
    port: int = Field(default=7341, ge=0, le=65535, description="TCP port to listen on (0 picks a free one)")
    token: str | None = Field(default=None, description=(
        "the token clients must send in `hello`; they read it from the runtime file"),
        json_schema_extra={"unset": "a new random one each start"})
    allowed_origins: Annotated[list[str], NoDecode] = Field(default=[], description=(
        "browser Origins allowed to connect; a handshake with any other Origin gets HTTP 403 "
        "(`*` allows any: avoid)"))
    runtime_file: Path | None = Field(default=None, description=(
        "where the url, token and pid are published, readable only by you; engine plugins find the daemon "
        "there"), json_schema_extra={"unset": (
            "`loraloom/daemon.json` under `$XDG_RUNTIME_DIR` or `~/.local/state` "
            "(`%LOCALAPPDATA%` on Windows, `~/Library/Application Support` on macOS)")})

    text_model: str = Field(default="default", description=(
        "a Hugging Face folder (Llama 2/3, Mistral, SmolLM2, TinyLlama, Qwen2/2.5), "
        "`default` (the embedded SmolLM2-135M-Instruct) or `none`"))
    text_engine: Literal["builtin", "remote"] = Field(default="builtin", description=(
        "what runs `text_model`: `builtin` (this process) or `remote` (a vLLM, SGLang or trtllm-serve server "
        "at `remote_url`; `text_model` then only gives the tokenizer, chat template and shapes)"))
    image_model: str = Field(default="default", description=(
        "a diffusers folder, `default` (a tiny placeholder that draws noise; off without the `image` extra) "
        "or `none`"))
    pack: Path | None = Field(default=None, description=(
        "a game pack folder (`loraloom pack`): its model, adapters and settings, checked against its manifest "
        "before anything loads (options given here win over the pack's settings)"), json_schema_extra={"unset": "none"})
    cache_dir: Path | None = Field(default=None, description="where converted and generated models are kept",
                                   json_schema_extra={"unset": "`$XDG_CACHE_HOME/loraloom` or `~/.cache/loraloom`"})
    device: str = Field(default="auto", description="`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`")
    dtype: str = Field(default="auto", description=(
        "`auto` (bfloat16 on CUDA, float32 on the CPU), `float32`, `bfloat16` or `float16`"))
    quantize: Literal["int8", "int4", "fp8"] | None = Field(default=None, description=(
        "weight-only quantization of a dense text model at load, round-to-nearest: `int8` (a scale per output "
        "channel), `int4` (groups of 128, with zero points) or `fp8` (e4m3, groups of 128), the embedding table and "
        "an untied vocab head too; LoRA stays in the compute dtype on top (AWQ and GPTQ folders load quantized "
        "without it)"),
        json_schema_extra={"unset": "the folder's own weights"})

    text_adapters: Annotated[list[Path], NoDecode] = Field(default=[], description=(
        "text adapter folders; each sub-folder is one adapter (PEFT format) named after it"))
    image_adapters: Annotated[list[Path], NoDecode] = Field(default=[], description=(
        "image adapter folders; each sub-folder is one adapter (diffusers LoRA format) named after it"))
    watch: bool = Field(default=True, description="reload adapters when their files change")
    reload_debounce_ms: int = Field(default=200, ge=0, description=(
        "quiet time in milliseconds before a changed adapter folder is reloaded"))
    pinned_adapters: Annotated[list[str], NoDecode] = Field(default=[], description=(
        "adapters never evicted (from host memory or compute slots)"))
    adapter_capacity: int | None = Field(default=64, ge=1, description=(  # None (from Python only): no limit
        "adapters kept in host memory (LRU; an evicted one is read again on use)"))

    max_seqs: int = Field(default=16, ge=1, description=(
        "sequences generated at once (more wait, player lines first)"))
    max_context: int = Field(default=2048, ge=16, description=(
        "tokens per sequence, prompt included (at most the model's own context length)"))
    kv_cache_mb: int | None = Field(default=None, ge=1, description=(
        "the KV cache in MiB: one pool of 16-token blocks shared by every sequence and the prefix cache "
        "(when it runs out, the lowest-priority sequence pauses)"),
        json_schema_extra={"unset": "room for `max_seqs` sequences of `max_context` / 2 tokens"})
    lora_slots: int = Field(default=16, ge=1, description="adapters resident in compute memory at once")
    max_lora_rank: int = Field(default=64, ge=1, description=(
        "highest adapter rank accepted; each adapter costs its own rank per step, but the pool is allocated "
        "for all slots at this rank (1.2 GB for SmolLM2)"))
    prefill_chunk: int = Field(default=256, ge=1, description=(
        "prompt tokens of one sequence per engine step, so a long prompt does not stall the other streams"))
    step_tokens: int = Field(default=512, ge=16, description=(
        "tokens of all sequences in one engine step (decode tokens first, then prompt chunks): bounds how long "
        "the running streams wait for their next token while prompts come in"))
    prefix_cache: bool = Field(default=True, description=(
        "keep the keys and values of full 16-token blocks after a request ends, for later requests with the same "
        "prefix on the same adapter versions and scales (a conversation's next turn)"))
    priorities: bool = Field(default=True, description=(
        "admit and prefill requests by their `priority` (player, normal, background) and pause lower priorities "
        "for higher ones; false: arrival order only"))
    kernels: bool = Field(default=True, description=(
        "compiled kernels where installed: Triton on CUDA, a numba loop for CPU decode steps "
        "(false: PyTorch ops only; the startup log names the LoRA kernel in use)"))
    deterministic: bool = Field(default=False, description=(
        "the same model, adapter versions and scales, prompt, sampling settings and seed give the same tokens "
        "whatever else shares the batch (replays, QA, saves); on CUDA with fixed row counts (checked at start), "
        "Triton kernels and CUDA graphs; costs speed: about 2x on the CPU, 8-16% of the decode step on an H200 "
        "(docs/BENCHMARKS.md)"))

    gpu_memory_mb: int | None = Field(default=None, ge=1, description=(
        "the most memory the engines may take on their device (GPU memory; on the CPU, RAM): weights, KV cache, "
        "LoRA pool, step workspace, image model; unset `kv_cache_mb` and `lora_slots` are fitted into it, and "
        "a model that does not fit is refused at start"), json_schema_extra={"unset": "no cap"})

    gpu_duty_cap: float | None = Field(default=None, gt=0.0, le=1.0, description=(
        "the fraction of wall time the engines' GPU work may occupy, so the game keeps the rest (a client's "
        "`set_budget` replaces the budget while it is connected)"), json_schema_extra={"unset": "no cap"})
    tokens_per_s_player: float | None = Field(default=None, gt=0.0, description=(
        "generated tokens per second of `player` requests, at most"), json_schema_extra={"unset": "no cap"})
    tokens_per_s_normal: float | None = Field(default=None, gt=0.0, description=(
        "generated tokens per second of `normal` requests, at most"), json_schema_extra={"unset": "no cap"})
    tokens_per_s_background: float | None = Field(default=None, gt=0.0, description=(
        "generated tokens per second of `background` requests (ambient chatter), at most"),
        json_schema_extra={"unset": "no cap"})
    max_step_ms: float | None = Field(default=None, ge=0.5, description=(
        "while a budget is set: the longest engine step (prompt chunks shrink to fit; a frame-synced budget "
        "also bounds it by the free part of a frame)"), json_schema_extra={"unset": "no bound"})

    remote_url: str | None = Field(default=None, description=(
        "the remote engine's OpenAI-compatible server, e.g. `http://127.0.0.1:8000` (with `text_engine` "
        "`remote`)"), json_schema_extra={"unset": "none"})
    remote_dialect: Literal["vllm", "sglang", "trtllm"] = Field(default="vllm", description=(
        "which server `remote_url` is: how it names adapters, loads and unloads them, which sampling values it "
        "takes"))
    remote_api_key: str | None = Field(default=None, description=(
        "sent as `Authorization: Bearer KEY` to the remote (prefer `LORALOOM_REMOTE_API_KEY` to a flag)"),
        json_schema_extra={"unset": "none"})
    remote_model: str | None = Field(default=None, description="the base model's name on the remote",
                                     json_schema_extra={"unset": "the first model the remote lists"})
    remote_adapter_dir: Path | None = Field(default=None, description=(
        "where adapter versions and mixes are written for the remote to read (a folder shared with it when it "
        "runs elsewhere)"), json_schema_extra={"unset": (
            "`remote-adapters` in the cache folder when the remote is on loopback; otherwise adapters are refused")})
    remote_adapter_path: str | None = Field(default=None, description=(
        "the path under which the remote sees `remote_adapter_dir` (another machine's mount point, a container's "
        "volume)"), json_schema_extra={"unset": "the same path"})
    remote_mix_cache: int = Field(default=8, ge=1, description=(
        "mixes kept registered with the remote (LRU); a new mix is built and loaded on its first request"))
    remote_timeout_s: int = Field(default=60, ge=1, description=(
        "the longest wait for the remote: to connect, and between two bytes of an answer"))

    image_max_batch: int = Field(default=4, ge=1, description=(
        "images per image-model call; every call runs at this size, so a request's bytes do not depend on "
        "its companions (1: lowest latency for a lone request)"))

    max_frame_bytes: int = Field(default=1 << 20, ge=1024, description=(
        "largest frame accepted, in bytes; a larger one is answered with `frame_too_large`"))
    max_inflight_per_connection: int = Field(default=64, ge=1, description=(
        "requests in flight at once on one connection"))
    max_prompt_tokens: int | None = Field(default=None, description=(
        "tokens of a text prompt after the chat template (never more than the context length minus one)"),
        json_schema_extra={"unset": "the context length minus one"})
    max_new_tokens: int = Field(default=4096, ge=1, description="the largest `max_tokens` a request may ask for")
    max_adapters_per_request: int = Field(default=4, ge=1, le=MAX_ADAPTERS, description=(
        f"adapters in one request's mix (at most {MAX_ADAPTERS}, the protocol's limit)"))

    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description=(
        "how much the daemon logs (to stderr)"))

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


# The first field of each group; a group runs until the next one starts (the fields' order above).
GROUP_STARTS: dict[str, str] = {
    "host": "network and security",
    "text_model": "models",
    "text_adapters": "adapters",
    "max_seqs": "text engine capacity",
    "gpu_memory_mb": "memory budget",
    "gpu_duty_cap": "GPU budget (sharing the GPU with the game)",
    "remote_url": "remote text engine",
    "image_max_batch": "image engine capacity",
    "max_frame_bytes": "limits",
    "log_level": "logging",
}

# Command-line spellings that are not `--field-name` (they predate the derived options).
FLAG_NAMES: dict[str, str] = {
    "allowed_origins": "--allow-origin",
    "pinned_adapters": "--pin",
    "max_inflight_per_connection": "--max-inflight",
}


def load_settings(config: Path | None = None, **values: Any) -> Settings:
    """Settings from `values` (strongest), the environment, and the TOML file `config` (None:
    `$LORALOOM_CONFIG`'s). The file source reads `LORALOOM_CONFIG`, so it is set only meanwhile: a
    process that loads settings twice (tests, a pack's settings) never sees an old file again."""
    if config is None:
        return Settings(**values)
    before = os.environ.get("LORALOOM_CONFIG")
    os.environ["LORALOOM_CONFIG"] = str(config)
    try:
        return Settings(**values)
    finally:
        if before is None:
            os.environ.pop("LORALOOM_CONFIG", None)
        else:
            os.environ["LORALOOM_CONFIG"] = before


def groups() -> list[tuple[str, list[str]]]:
    """(group, field names) in the order of the fields."""
    out: list[tuple[str, list[str]]] = []
    for name in Settings.model_fields:
        if name in GROUP_STARTS:
            out.append((GROUP_STARTS[name], []))
        elif not out:
            raise ValueError(f"setting {name} comes before the first group")
        out[-1][1].append(name)
    return out


def flag(name: str) -> str:
    """The command-line option of a setting (a bool also has its `--no-` form)."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def default_text(name: str) -> str:
    """A setting's default as the README and `--help` show it (Markdown: words in backticks are values).

    A field whose default is None says what that means in `json_schema_extra={"unset": ...}`.
    """
    field = Settings.model_fields[name]
    value = field.default
    if value is None:
        extra = field.json_schema_extra
        return str(extra["unset"]) if isinstance(extra, dict) and "unset" in extra else "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value) or "none"
    if isinstance(value, int | float):
        return str(value)
    return f"`{value}`"


# ---------------------------------------------------------------------------- the README's table

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_BEGIN = "<!-- settings-table:begin (generated from daemon/settings.py: python -m daemon.settings --readme) -->"
TABLE_END = "<!-- settings-table:end -->"


def readme_table() -> str:
    """The Configuration table: one row per setting, a bold row where each group starts."""
    lines = ["| setting | option | default | meaning |", "| --- | --- | --- | --- |"]
    for group, names in groups():
        lines.append(f"| **{group}** | | | |")
        for name in names:
            field = Settings.model_fields[name]
            option = flag(name)
            if field.annotation is bool:
                option = option.replace("--", "--[no-]", 1)
            option = f"`{option}`" + (" (repeatable)" if get_origin(field.annotation) is list else "")
            meaning = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {option} | {default_text(name)} | {meaning} |")
    return "\n".join(lines) + "\n"


def update_readme(text: str) -> str:
    """`text` (the README) with the table between the markers replaced by a fresh one."""
    head, begin, rest = text.partition(TABLE_BEGIN + "\n")
    _, end, tail = rest.partition(TABLE_END)
    if not begin or not end:
        raise ValueError(f"README.md lacks the markers {TABLE_BEGIN!r} ... {TABLE_END!r}")
    return head + begin + readme_table() + end + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.settings", description="README.md's settings table.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    action.add_argument("--check", action="store_true", help="exit 1 if the table in README.md is stale")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    fresh = update_readme(text)
    if args.check:
        if fresh != text:
            print("README.md's settings table is stale: run python -m daemon.settings --readme", file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        README.write_text(fresh, encoding="utf-8")
        print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
