"""The `loraloom` command: serve, ask, adapters, demo, pack and bundle (daemon/pack.py, daemon/bundle.py).

Exit codes: 0 success; 1 the daemon refused or failed the request; 2 bad usage; 3 no daemon
reachable (or it went away); 4 the model's answer was empty.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bridge.errors import ConnectionClosed, DaemonNotFound, LoraloomError

from . import __version__, bundle, pack

__all__ = ["main"]

EXIT_OK, EXIT_REQUEST, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_EMPTY = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------- serve

def _add_serve_options(p: argparse.ArgumentParser) -> None:
    """One option per setting, built from the fields of `Settings` (daemon/settings.py says what each means).

    The flag is `--field-name` (or its spelling in FLAG_NAMES), the help is the field's description and
    its default, the type comes from the annotation: a Literal gives choices, a bool a `--x/--no-x` pair,
    a list a repeatable option. Every option defaults to SUPPRESS, so one that is not given is absent
    from the namespace and never overrides the environment or the config file.
    """
    from .settings import flag, groups

    p.add_argument("--config", type=Path, metavar="FILE", help="TOML file with any of these settings")
    for group, names in groups():
        g = p.add_argument_group(group)
        for name in names:
            g.add_argument(flag(name), dest=name, default=argparse.SUPPRESS, **_serve_option(name))


def _serve_option(name: str) -> dict[str, Any]:
    """add_argument's keywords for one setting: its type, help and metavar."""
    import types
    import typing

    from .settings import Settings, default_text, flag

    field = Settings.model_fields[name]
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None`: the option gives an int
        (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
    repeatable = typing.get_origin(kind) is list
    # In --help, Markdown's `value` reads as 'value'; argparse expands %-formats in help.
    help_text = (f"{field.description} ({'repeatable; ' if repeatable else ''}default: {default_text(name)})"
                 .replace("`", "'").replace("%", "%%"))
    metavar = flag(name).rsplit("-", 1)[-1].upper()  # --runtime-file FILE, --text-model MODEL
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if repeatable:
        (item,) = typing.get_args(kind)
        metavar = "DIR" if item is Path else name.rsplit("_", 1)[-1].removesuffix("s").upper()  # --pin ADAPTER
        return {"action": "append", "type": item, "metavar": metavar, "help": help_text}
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": typing.get_args(kind), "help": help_text}
    if kind in (int, float):
        return {"type": kind, "metavar": "N", "help": help_text}
    if kind in (str, Path):
        return {"type": kind, "metavar": metavar, "help": help_text}
    raise TypeError(f"setting {name}: no command-line option for the type {field.annotation}")


def _settings_from_args(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from .settings import Settings, load_settings

    if args.config is not None and not args.config.exists():
        raise SystemExit(f"loraloom: config file {args.config} does not exist")
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        return load_settings(args.config, **overrides)
    except ValidationError as exc:
        raise SystemExit(f"loraloom: invalid settings:\n{exc}") from None


async def serve_async(settings: Any, *, ready: asyncio.Event | None = None) -> None:
    from bridge.discovery import RuntimeInfo, default_runtime_file, remove_runtime_file, write_runtime_file
    from bridge.messages import PROTOCOL_VERSION

    from .server import DaemonServer
    from .service import Service

    log = logging.getLogger("loraloom")
    started = time.monotonic()
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s, not loopback: anyone who can reach this machine and has the token "
                    "can use the daemon", settings.host)
    token = settings.token or secrets.token_urlsafe(24)
    service = await asyncio.to_thread(Service.from_settings, settings)
    service.start()
    server = DaemonServer(service, token=token)
    await server.start()
    runtime_file = settings.runtime_file or default_runtime_file()
    write_runtime_file(RuntimeInfo(url=server.url, host=str(server.host), port=server.port, token=token,
                                   pid=os.getpid(), version=__version__, protocol=PROTOCOL_VERSION), runtime_file)
    _, image = service.model_infos()
    if image is not None and image.placeholder:
        log.warning("image model: %s — a PLACEHOLDER with random weights that draws noise; "
                    "pass --image-model PATH for a real diffusers model", image.name)
    log.info("runtime file %s", runtime_file)
    log.info("ready in %.1f s", time.monotonic() - started)
    log.info("listening on %s", server.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.stop()
        remove_runtime_file(runtime_file, pid=os.getpid())
        log.info("stopped")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("websockets", "watchdog", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Libraries' warnings (deprecations, dtype notes) are about their code, not about anything a
    # daemon user can change: into the log at debug level only.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if level == "debug" else logging.ERROR)
    if level != "debug":  # read when those libraries are first imported (they set their own levels then)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    _setup_logging(settings.log_level)
    try:
        asyncio.run(serve_async(settings))
    except (FileNotFoundError, ValueError) as exc:
        logging.getLogger("loraloom").error("%s", exc)
        return EXIT_USAGE
    except OSError as exc:
        logging.getLogger("loraloom").error("cannot start: %s", exc)
        return EXIT_NO_DAEMON
    return EXIT_OK


# ---------------------------------------------------------------------------- clients

def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="daemon URL (default: from the runtime file)")
    p.add_argument("--token", help="token (default: from the runtime file)")
    p.add_argument("--runtime-file", type=Path, help="runtime file to read url and token from")


def _connect(args: argparse.Namespace) -> Any:
    import bridge

    return bridge.connect(args.url, args.token, client_name="cli", runtime_file=args.runtime_file)


def _run_client(coro: Any) -> int:
    try:
        return int(asyncio.run(coro))
    except DaemonNotFound as exc:
        print(f"loraloom: {exc.message}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except ConnectionClosed as exc:
        print(f"loraloom: {exc.message}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except LoraloomError as exc:
        print(f"loraloom: {exc}", file=sys.stderr)
        return EXIT_REQUEST
    except KeyboardInterrupt:
        return 130


async def _ask(args: argparse.Namespace) -> int:
    if args.raw and args.system is not None:
        print("loraloom: --system needs the chat template; leave out --raw", file=sys.stderr)
        return EXIT_USAGE
    # A chat model answers a chat turn; a raw prompt is continued as text (often with nothing at all).
    chat = None if args.raw else [{"role": "user", "content": args.prompt}]
    async with _connect(args) as client:
        stream = client.generate(
            args.prompt if args.raw else None, messages=chat, system=args.system, adapters=args.adapter or [],
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=args.seed, stop=args.stop or [])
        try:
            async for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:
            await stream.aclose()
        sys.stdout.write("\n")
        r = stream.result
        if args.verbose and r is not None:
            print(f"[{r.finish_reason}; {r.prompt_tokens} prompt + {r.completion_tokens} tokens; "
                  f"first token {r.timings.first_token_ms} ms; {r.timings.tokens_per_s} tokens/s; "
                  f"adapters {r.adapter_versions}]", file=sys.stderr)
    if r is not None and not r.text.strip():
        print(f"loraloom: the model's answer was empty ({r.completion_tokens} tokens, finish_reason "
              f"{r.finish_reason}); try another --seed or a higher --temperature", file=sys.stderr)
        return EXIT_EMPTY
    return EXIT_OK


def _run_request(coro: Any) -> int:
    """Run a client command; a request the protocol models refuse is a usage error (exit 2)."""
    from pydantic import ValidationError

    try:
        return _run_client(coro)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "request"
        print(f"loraloom: invalid request: {where}: {err['msg']}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # e.g. an adapter spec whose scale is not a number
        print(f"loraloom: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_ask(args: argparse.Namespace) -> int:
    return _run_request(_ask(args))


async def _adapters(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        infos = await client.adapters()
    if args.json:
        import json

        print(json.dumps([i.model_dump() for i in infos], indent=2))
        return EXIT_OK
    rows = [("NAME", "KIND", "STATUS", "VERSION", "RANK", "TARGETS", "ERROR")]
    for i in infos:
        rows.append((i.name, i.kind, i.status, str(i.version or "-"), str(i.rank or "-"),
                     ",".join(t.removesuffix("_proj") for t in i.targets) or "-", i.error or ""))
    widths = [max(len(r[c]) for r in rows) for c in range(6)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(6)) + ("  " + r[6] if r[6] else ""))
    if len(rows) == 1:
        print("(no adapters; start the daemon with --text-adapters DIR)")
    return EXIT_OK


async def _image(args: argparse.Namespace) -> int:
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"loraloom: --size must look like 512x512, not {args.size!r}", file=sys.stderr)
        return EXIT_USAGE
    async with _connect(args) as client:
        model = client.welcome.image_model
        if model is not None and model.placeholder:
            print(f"note: the daemon's image model is {model.name}: a placeholder that draws noise", file=sys.stderr)
        stream = client.generate_image(args.prompt, adapters=args.adapter or [], negative_prompt=args.negative,
                                       width=width, height=height, steps=args.steps, guidance=args.guidance,
                                       seed=args.seed, count=args.count)
        async for progress in stream:
            print(f"\rstep {progress.step}/{progress.total}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        result = stream.result
        assert result is not None
    outputs = [args.output] if len(result.images) == 1 else [
        args.output.with_name(f"{args.output.stem}-{i}{args.output.suffix}") for i in range(len(result.images))]
    for path, png in zip(outputs, result.images, strict=True):
        path.write_bytes(png)
        print(f"wrote {path} ({result.width}x{result.height}, seed {result.seed})")
    return EXIT_OK


def cmd_image(args: argparse.Namespace) -> int:
    return _run_request(_image(args))


def cmd_adapters(args: argparse.Namespace) -> int:
    return _run_client(_adapters(args))


def cmd_train(args: argparse.Namespace) -> int:
    try:
        import peft  # noqa: F401
    except ImportError:
        print("loraloom: `loraloom train` needs PEFT: pip install -e '.[train]' (or pip install peft)",
              file=sys.stderr)
        return EXIT_USAGE
    from .engines.text.default_model import ensure_default_text_model
    from .train import TrainConfig, train_adapter

    _setup_logging("info")
    try:
        base = ensure_default_text_model(args.cache_dir) if args.base == "default" else Path(args.base)
        batch = args.batch_size
        if batch is None:
            import torch

            on_gpu = args.device != "cpu" and (args.device.startswith("cuda") or torch.cuda.is_available())
            batch = 8 if on_gpu else 4
        cfg = TrainConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                          targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), steps=args.steps,
                          lr=args.lr, batch_size=batch, max_length=args.max_length, seed=args.seed,
                          device=args.device)
        folder = train_adapter(base, args.data, args.out, args.name, cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"loraloom: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {folder}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Run benchmarks/bench_NAME.py of the source tree (benchmarks are not installed with the package)."""
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.which}.py"
    if not script.exists():
        print(f"loraloom: {script} is not here: benchmarks live in the source repository; run `loraloom bench` "
              "from a clone (pip install -e .)", file=sys.stderr)
        return EXIT_USAGE
    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraloom", description="A local multi-LoRA runtime for games.")
    parser.add_argument("--version", action="version", version=f"loraloom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    _add_serve_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ask", help="stream one answer from the running daemon")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--adapter", "-a", action="append", metavar="NAME[:SCALE]", help="adapter (repeat for a mix)")
    p.add_argument("--system", help="system prompt (a persona) before the question")
    p.add_argument("--raw", action="store_true",
                   help="send PROMPT as raw text to continue, without the model's chat template")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--verbose", "-v", action="store_true", help="print token counts and timings to stderr")
    _add_client_options(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("image", help="generate an image on the running daemon")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    p.add_argument("--adapter", "-a", action="append", metavar="NAME[:SCALE]", help="image adapter (repeatable)")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--size", default="512x512", help="WIDTHxHEIGHT, multiples of 8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int)
    p.add_argument("--count", type=int, default=1)
    _add_client_options(p)
    p.set_defaults(func=cmd_image)

    p = sub.add_parser("adapters", help="list the daemon's adapters")
    p.add_argument("--json", action="store_true")
    _add_client_options(p)
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("train", help="fine-tune a LoRA adapter on the base model with PEFT")
    p.add_argument("--data", type=Path, required=True, help="JSONL of chat examples, or lines of text")
    p.add_argument("--name", required=True, help="adapter name (the folder written under --out)")
    p.add_argument("--out", type=Path, default=Path("adapters"), help="adapter folder (default ./adapters)")
    p.add_argument("--base", default="default", help="base model folder, or 'default' (embedded SmolLM2)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, help="lora_alpha (default 2 x rank)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, help="examples per step (default 8 on a GPU, 4 on a CPU)")
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="benchmarks/bench_WHICH.py: `loraloom bench text --help`, and so on")
    p.add_argument("which", choices=["text", "latency", "gpu_share", "quant_matmul", "image", "reload", "remote"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="several NPCs answering at once on the embedded model (no daemon needed)")
    p.add_argument("--adapters", type=Path, help="text adapter folder (default: samples/adapters)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--text-model", default="default")
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=cmd_demo)
    pack.add_command(sub, _add_serve_options, _settings_from_args)
    bundle.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `loraloom`: say what it can do
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "ask" and args.prompt is not None and not args.prompt.strip():
        parser.error("the prompt is empty")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
