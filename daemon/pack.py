"""The game pack: one folder a game carries, and the check a daemon makes before serving it.

`loraloom pack --model DIR --adapters DIR... --out PACK [serve options]` writes

    PACK/manifest.json   format, runtime version, base model hash, each adapter's hash/rank/targets/kind,
                         the expected memory with the pack's settings (daemon/memory.py), those settings
    PACK/model/          the text model as the engine loads it (config, safetensors, tokenizer files)
    PACK/adapters/<name>/        text adapters (PEFT), each checked against the base model
    PACK/image_adapters/<name>/  image adapters (diffusers LoRA), when given

`loraloom serve --pack PACK` reads the manifest and refuses, with the reason, a pack of a newer
format, a model whose files are not the base the pack was built for (or a `--text-model` that is
another base), and an adapter whose files are not the ones the manifest lists (or are not listed).
Then it is the same daemon: the pack's settings apply where no option, environment variable or
config file gives one, and the adapter folders are watched and hot-reloaded as usual (the check
is made at start; a designer editing a pack's adapter while the game runs is the point of reload).

Hashes: the model's is sha256 over its files' names and sha256s (checked file by file at start;
the digests of files whose size and modification time are unchanged are remembered in the cache
folder, so a 16 GB base is hashed once per install, not once per start). An adapter's is the
registry's own (`AdapterInfo.hash` on the wire), so a client can compare it with the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["FORMAT", "PackError", "add_command", "build_pack", "model_files", "model_hash", "open_pack",
           "packed_model_name"]

log = logging.getLogger("loraloom")

FORMAT = 1  # manifest.json's layout; a runtime reads packs of this format and older
MANIFEST = "manifest.json"
# Settings that belong to the machine or the launch, never to a pack.
NOT_PACKED = frozenset({"host", "port", "token", "allowed_origins", "runtime_file", "cache_dir", "pack",
                        "text_model", "text_adapters", "image_adapters", "text_engine", "remote_url",
                        "remote_api_key", "remote_adapter_dir", "remote_adapter_path", "log_level"})
# Weight formats the engine never reads (it loads safetensors only): left out of the pack.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".md")


class PackError(ValueError):
    """A pack that cannot be built or served as it is; the message says why and what to do."""


# ---------------------------------------------------------------------------- hashes

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that the engine reads (its top level, safetensors weights only)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and not p.name.endswith(SKIPPED_SUFFIXES))
    if not any(p.suffix == ".safetensors" for p in files):
        raise PackError(f"{folder} has no *.safetensors weights (the engine loads safetensors only)")
    return files


def _file_digests(folder: Path, cache: Path | None) -> dict[str, str]:
    """name -> sha256 of each model file; digests of unchanged files come from `cache` (a JSON file)."""
    known: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text(encoding="utf-8")).get(str(folder.resolve()), {})
        except ValueError:
            known = {}
    out, stamps = {}, {}
    for path in model_files(folder):
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        entry = known.get(path.name)
        out[path.name] = entry[2] if entry and entry[:2] == stamp else _sha256(path)
        stamps[path.name] = [*stamp, out[path.name]]
    if cache is not None:
        try:
            data = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
            data[str(folder.resolve())] = stamps
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(data), encoding="utf-8")
        except (OSError, ValueError):  # a read-only cache is only slower
            pass
    return out


def model_hash(digests: dict[str, str]) -> str:
    """One sha256 for a model: over each file's name and sha256, in name order."""
    return hashlib.sha256("".join(f"{n}\0{d}\n" for n, d in sorted(digests.items())).encode()).hexdigest()


# ---------------------------------------------------------------------------- building a pack

def _adapter_folders(dirs: list[Path]) -> list[Path]:
    """Each DIR is an adapter folder (it holds adapter_config.json or a *.safetensors) or a folder of them."""
    found: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise PackError(f"adapter folder {d} does not exist")
        if (d / "adapter_config.json").is_file() or any(d.glob("*.safetensors")):
            found.append(d)
        else:
            found += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = [p.name for p in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PackError(f"several adapters are named {', '.join(twice)}: names must be unique in a pack")
    return found


def _text_adapter_entry(folder: Path, spec: Any, max_rank: int) -> dict[str, Any]:
    from .adapters.loader import read_adapter_files
    from .engines.text.peft_format import prepare_peft_lora

    try:
        files = read_adapter_files(folder, "text")
        prepared = prepare_peft_lora(files.config, files.tensors, spec, max_rank=max_rank)
    except ValueError as exc:
        raise PackError(f"adapter {folder.name} does not fit the base model: {exc}") from None
    return {"name": folder.name, "kind": "text", "hash": files.hash, "rank": prepared.rank,
            "targets": list(prepared.targets), "files": files.files}


def _image_adapter_entry(folder: Path) -> dict[str, Any]:
    from .adapters.loader import read_adapter_files

    try:
        files = read_adapter_files(folder, "image")
    except ValueError as exc:
        raise PackError(f"image adapter {folder.name}: {exc}") from None
    downs = [t for k, t in files.tensors.items() if (".lora_A." in k or ".lora.down." in k) and t.dim() >= 2]
    targets = sorted({k.split(".lora")[0].rsplit(".", 1)[-1] for k in files.tensors if ".lora" in k})
    return {"name": folder.name, "kind": "image", "hash": files.hash,
            "rank": max((int(t.shape[0]) for t in downs), default=None), "targets": targets, "files": files.files}


def expected_memory(settings: Settings, folder: Path) -> dict[str, Any]:
    """MiB the engines take with these settings: on a CUDA GPU (VRAM) and on a CPU-only machine (RAM)."""
    from .memory import MIB, fit_for_settings

    def mib(n: int) -> int:
        return -(-n // MIB)

    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    out: dict[str, Any] = {}
    for device, auto in (("cuda", "bfloat16"), ("cpu", "float32")):
        dtype = auto if settings.dtype == "auto" else settings.dtype
        t = fit_for_settings(settings, folder, sizes[dtype])
        out[device] = {"dtype": dtype, "reserved_mb": mib(t.total), "weights_mb": mib(t.weights),
                       "kv_cache_mb": mib(t.kv_cache), "lora_pool_mb": mib(t.lora_pool),
                       "workspace_mb": mib(t.workspace), "kv_cache_tokens": t.kv_cache_tokens,
                       "lora_slots": t.lora_slots}
    return out


def _adapters_mb(entries: list[dict[str, Any]]) -> int:
    """The adapters' files in MiB: about what the host's adapter cache holds once each was used."""
    return -(-sum(size for e in entries for size in e["files"].values()) // 2**20)


def build_pack(model: str, adapters: list[Path], out: Path, settings: Settings,
               image_adapters: list[Path] | None = None) -> dict[str, Any]:
    """Write the pack folder `out` (replaced when it exists) and return its manifest."""
    from bridge.messages import PROTOCOL_VERSION

    from .engines.text.config import ModelSpec
    from .memory import OverBudget

    if model == "default":
        from .engines.text.default_model import ensure_default_text_model

        folder = ensure_default_text_model(settings.cache_dir)
    else:
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise PackError(f"{folder} is not a Hugging Face model folder (no config.json)")
    spec = ModelSpec.from_folder(folder)
    text = [_text_adapter_entry(p, spec, settings.max_lora_rank) for p in _adapter_folders(adapters)]
    image = [_image_adapter_entry(p) for p in _adapter_folders(image_adapters or [])]
    try:
        memory = expected_memory(settings, folder)
    except OverBudget as exc:
        raise PackError(f"the pack's own settings do not fit: {exc}") from None
    packed = {k: v for k, v in settings.model_dump(mode="json").items()
              if k in settings.model_fields_set and k not in NOT_PACKED}
    packed.setdefault("image_model", "none")  # a pack carries no image model; a game passes one if it has it
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "model").mkdir(parents=True)
    for path in model_files(folder):
        shutil.copy2(path, tmp / "model" / path.name)
    for entries, sources, sub in ((text, adapters, "adapters"), (image, image_adapters or [], "image_adapters")):
        (tmp / sub).mkdir(exist_ok=True)
        for entry, src in zip(entries, _adapter_folders(sources), strict=True):
            shutil.copytree(src, tmp / sub / entry["name"], ignore=shutil.ignore_patterns(".*"))
    digests = _file_digests(tmp / "model", None)
    manifest = {
        "format": FORMAT, "runtime": __version__, "protocol": PROTOCOL_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": folder.name, "hash": model_hash(digests), "files": digests,
                  "family": spec.family, "parameters": spec.num_parameters(),
                  "context_length": spec.max_position_embeddings},
        "adapters": text + image, "memory": {**memory, "adapters_mb": _adapters_mb(text + image)},
        "settings": packed}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


# ---------------------------------------------------------------------------- serving a pack

def read_manifest(pack: Path) -> dict[str, Any]:
    path = pack / MANIFEST
    if not path.is_file():
        raise PackError(f"{pack} is not a game pack: it has no {MANIFEST} (build one with `loraloom pack`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise PackError(f"{path} is not valid JSON: {exc}") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(fmt, int):
        raise PackError(f"{path} has no format number: not a loraloom pack manifest")
    if fmt > FORMAT:
        raise PackError(f"the pack {pack} has format {fmt} (made by loraloom {manifest.get('runtime', '?')}); this "
                        f"runtime ({__version__}) reads format {FORMAT} at most: ship a newer runtime with it")
    return manifest


def _check_model(folder: Path, manifest: dict[str, Any], cache: Path | None, *, given: bool) -> None:
    expected = manifest["model"]
    try:
        digests = _file_digests(folder, cache)
    except (OSError, PackError) as exc:
        raise PackError(f"the pack's model cannot be read: {exc}") from None
    if model_hash(digests) == expected["hash"]:
        return
    if given:
        raise PackError(f"this pack was built for another base: {expected['name']} (sha256 {expected['hash'][:16]}), "
                        f"while text_model {folder} is {model_hash(digests)[:16]}; its adapters only fit their own "
                        "base: leave --text-model out, or rebuild the pack for this model")
    files: dict[str, str] = expected.get("files", {})
    changed = sorted(n for n in set(files) | set(digests) if files.get(n) != digests.get(n))
    raise PackError(f"the pack's model is not the base it was built for ({expected['name']}): "
                    f"{', '.join(changed)} differ from the manifest; rebuild the pack with `loraloom pack`")


def _check_adapters(manifest: dict[str, Any], folders: dict[str, Path]) -> None:
    from .adapters.loader import read_adapter_files

    listed = {(a["kind"], a["name"]): a for a in manifest.get("adapters", [])}
    for kind, sub in (("text", "adapters"), ("image", "image_adapters")):
        root = folders[sub]
        present = (sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
                   if root.is_dir() else [])
        for path in present:
            entry = listed.get((kind, path.name))
            if entry is None:
                raise PackError(f"{kind} adapter {path.name} in {root} is not in the pack's manifest: rebuild the "
                                "pack with `loraloom pack`, or remove the folder")
            try:
                digest = read_adapter_files(path, kind).hash  # type: ignore[arg-type]
            except ValueError as exc:
                raise PackError(f"{kind} adapter {path.name} of the pack cannot be read: {exc}") from None
            if digest != entry["hash"]:
                raise PackError(f"{kind} adapter {path.name}'s files differ from the pack's manifest (sha256 {digest}, "
                                f"manifest {entry['hash']}): the pack was changed after it was built; rebuild it "
                                "with `loraloom pack`")
        missing = sorted(n for k, n in listed if k == kind and not (root / n).is_dir())
        if missing:
            raise PackError(f"the pack's {kind} adapters {', '.join(missing)} are missing from {root}")


def open_pack(settings: Settings) -> Settings:
    """Validate `settings.pack` and return the settings to serve it with: the pack's model, adapters
    and settings where nothing stronger (an option, the environment, a config file) gives one."""
    from .engines.text.default_model import default_cache_dir
    from .settings import Settings

    assert settings.pack is not None
    pack = settings.pack.expanduser().resolve()
    manifest = read_manifest(pack)
    given = settings.model_fields_set
    if manifest.get("runtime") != __version__:
        log.info("pack built by loraloom %s, served by %s", manifest.get("runtime"), __version__)
    model = Path(settings.text_model) if "text_model" in given else pack / "model"
    if "text_model" in given and settings.text_model in ("none", "default"):
        raise PackError(f"--text-model {settings.text_model} and --pack: the pack is built for its own model")
    cache = (settings.cache_dir or default_cache_dir()) / "pack-hashes.json"
    _check_model(model, manifest, cache, given="text_model" in given)
    folders = {"adapters": pack / "adapters", "image_adapters": pack / "image_adapters"}
    _check_adapters(manifest, folders)
    packed = dict(manifest.get("settings", {}))
    unknown = sorted(set(packed) - set(Settings.model_fields))
    if unknown:
        raise PackError(f"the pack sets {', '.join(unknown)}, which this runtime ({__version__}) does not know: "
                        "ship the runtime it was built with")
    values: dict[str, Any] = {**packed, "text_model": str(model), "text_adapters": [folders["adapters"]]}
    if folders["image_adapters"].is_dir():
        values["image_adapters"] = [folders["image_adapters"]]
    values.update({k: getattr(settings, k) for k in given})
    values["pack"] = pack
    served = Settings(**values)
    log.info("game pack %s: %s (sha256 %s), %d adapters, checked", pack, manifest["model"]["name"],
             manifest["model"]["hash"][:16], len(manifest.get("adapters", [])))
    return served


def packed_model_name(pack: Path, text_model: str, fallback: str) -> str:
    """The name the pack's manifest gives its model, when the daemon serves that model."""
    if Path(text_model) != pack / "model":
        return fallback
    try:
        return str(read_manifest(pack)["model"]["name"])
    except (PackError, KeyError, TypeError):
        return fallback


# ---------------------------------------------------------------------------- the command

def cmd_pack(args: argparse.Namespace, settings_from_args: Any) -> int:
    settings = settings_from_args(args)
    try:
        manifest = build_pack(args.model, [*args.adapters, *settings.text_adapters], args.out, settings,
                              image_adapters=settings.image_adapters)
    except PackError as exc:
        print(f"loraloom pack: {exc}", file=sys.stderr)
        return 2
    cuda, cpu = manifest["memory"]["cuda"], manifest["memory"]["cpu"]
    print(f"wrote {args.out}: {manifest['model']['name']} (sha256 {manifest['model']['hash'][:16]}), "
          f"{len(manifest['adapters'])} adapters; expected memory: {cuda['reserved_mb']} MiB on a CUDA GPU "
          f"({cuda['dtype']}), {cpu['reserved_mb']} MiB of RAM on a CPU ({cpu['dtype']})")
    return 0


def add_command(sub: Any, add_serve_options: Any, settings_from_args: Any) -> None:
    """`loraloom pack` on the CLI's subparsers; serve's options given here become the pack's settings
    (`--text-adapters` and `--image-adapters` add adapters; network and launch options are not recorded)."""
    p = sub.add_parser("pack", help="write a game pack: the model, adapters and a manifest a game ships")
    p.add_argument("--model", required=True, metavar="DIR", help="the base model folder, or 'default'")
    p.add_argument("--adapters", type=Path, nargs="+", default=[], metavar="DIR",
                   help="text adapter folders (one adapter, or a folder of adapter folders)")
    p.add_argument("--out", type=Path, required=True, metavar="PACK", help="the pack folder (replaced)")
    add_serve_options(p)  # recorded in the pack; --image-adapters adds image adapters
    p.set_defaults(func=lambda a: cmd_pack(a, settings_from_args))
