"""One settings model, three sources: command line > environment > TOML file > defaults.

The options of `loraloom serve` and README.md's Configuration table are built from the fields.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from pathlib import Path

import pytest

from bridge.messages import MAX_ADAPTERS
from daemon import settings as settings_module
from daemon.cli import _settings_from_args, build_parser, main
from daemon.settings import GROUP_STARTS, Settings, default_text, flag, groups, update_readme

FIELDS = Settings.model_fields

# Every flag `loraloom serve` had before the options were derived, and the setting it sets.
OLD_FLAGS = {
    "--host": "host", "--port": "port", "--token": "token", "--allow-origin": "allowed_origins",
    "--runtime-file": "runtime_file", "--text-model": "text_model", "--image-model": "image_model",
    "--cache-dir": "cache_dir", "--device": "device", "--dtype": "dtype", "--text-adapters": "text_adapters",
    "--image-adapters": "image_adapters", "--pin": "pinned_adapters", "--adapter-capacity": "adapter_capacity",
    "--no-watch": "watch", "--reload-debounce-ms": "reload_debounce_ms", "--max-seqs": "max_seqs",
    "--max-context": "max_context", "--lora-slots": "lora_slots", "--max-lora-rank": "max_lora_rank",
    "--no-kernels": "kernels", "--image-max-batch": "image_max_batch", "--max-frame-bytes": "max_frame_bytes",
    "--max-inflight": "max_inflight_per_connection", "--max-new-tokens": "max_new_tokens",
    "--log-level": "log_level",
}


@pytest.fixture(autouse=True)
def _no_loraloom_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("LORALOOM_"):
            monkeypatch.delenv(key)


def parse(*argv: str) -> Settings:
    return _settings_from_args(build_parser().parse_args(["serve", *argv]))


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def env_name(name: str) -> str:
    return "LORALOOM_" + name.upper()


def sample(name: str) -> list[str]:
    """Valid values for a setting, as text, that differ from its default (two for a list)."""
    field = FIELDS[name]
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
    if kind is bool:
        return [str(not field.default).lower()]
    if typing.get_origin(kind) is list:
        return ["/x/first" if typing.get_args(kind)[0] is Path else "first", "second"]
    if typing.get_origin(kind) is typing.Literal:
        return [next(c for c in typing.get_args(kind) if c != field.default)]
    if kind is float:
        return ["0.5"]
    if kind is int:
        low = next((m.ge for m in field.metadata if hasattr(m, "ge")), 0)
        return [str((field.default if field.default is not None else low) + 1)]
    return ["/x/somewhere" if kind is Path else "something"]


def as_flags(name: str, values: list[str]) -> list[str]:
    if FIELDS[name].annotation is bool:
        return [flag(name) if values[0] == "true" else flag(name).replace("--", "--no-", 1)]
    return [part for v in values for part in (flag(name), v)]


def test_sources_and_their_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "loraloom.toml"
    config.write_text('port = 9001\nmax_seqs = 3\ntext_adapters = ["/adapters/a", "/adapters/b"]\n'
                      'allowed_origins = ["http://game.example"]\nlog_level = "debug"\n')
    monkeypatch.setenv("LORALOOM_MAX_SEQS", "5")
    monkeypatch.setenv("LORALOOM_PINNED_ADAPTERS", "pirate,elf")
    s = parse("--config", str(config), "--port", "0")
    assert s.port == 0  # command line beats the file
    assert s.max_seqs == 5  # environment beats the file
    assert s.text_adapters == [Path("/adapters/a"), Path("/adapters/b")]  # from the file
    assert s.pinned_adapters == ["pirate", "elf"] and s.log_level == "debug"
    assert s.host == "127.0.0.1" and s.image_model == "default"  # defaults


def test_bad_settings_are_refused_with_the_field_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("max_seqs = 0\n")
    with pytest.raises(SystemExit, match="max_seqs"):
        parse("--config", str(config))
    with pytest.raises(SystemExit, match="does not exist"):
        parse("--config", str(tmp_path / "missing.toml"))
    config.write_text("colour = 'red'\n")
    with pytest.raises(SystemExit, match="colour"):
        parse("--config", str(config))
    with pytest.raises(SystemExit, match="max_adapters_per_request"):  # more than the protocol carries
        parse("--max-adapters-per-request", str(MAX_ADAPTERS + 1))


def test_kernels_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled kernels are on unless --no-kernels or LORALOOM_KERNELS=false turns them off."""
    assert parse().kernels is True
    assert parse("--no-kernels").kernels is False
    monkeypatch.setenv("LORALOOM_KERNELS", "false")
    assert parse().kernels is False
    assert parse("--kernels").kernels is True


def test_every_setting_has_a_description_a_group_and_a_flag() -> None:
    """Each field explains itself, sits in a group, and `serve` has exactly one option for it."""
    assert list(GROUP_STARTS) == [n for n in FIELDS if n in GROUP_STARTS]  # group starts in field order
    assert [n for _, names in groups() for n in names] == list(FIELDS)
    options = {a.dest: a for a in serve_parser()._actions if a.dest in FIELDS}
    assert set(options) == set(FIELDS)
    for name, field in FIELDS.items():
        assert field.description and not field.description.endswith("."), name
        assert flag(name) in options[name].option_strings, name
        if field.default is None:  # the README and --help say what no value means
            assert isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("unset"), name


def test_every_flag_of_before_still_works() -> None:
    """The spellings that differ from the field name (--pin, --allow-origin, ...) are kept."""
    parser = serve_parser()
    known = {s for a in parser._actions for s in a.option_strings}
    assert set(OLD_FLAGS) <= known
    for option, name in OLD_FLAGS.items():
        action = next(a for a in parser._actions if option in a.option_strings)
        assert action.dest == name, option
    s = parse("--pin", "elf", "--allow-origin", "http://a", "--max-inflight", "3", "--no-watch")
    assert (s.pinned_adapters, s.allowed_origins, s.max_inflight_per_connection, s.watch) == (
        ["elf"], ["http://a"], 3, False)


@pytest.mark.parametrize("name", list(FIELDS))
def test_a_flag_gives_the_value_its_environment_variable_gives(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--x-y V` and `LORALOOM_X_Y=V` set the same value, and it is not the default."""
    values = sample(name)
    from_flags = getattr(parse(*as_flags(name, values)), name)
    monkeypatch.setenv(env_name(name), ",".join(values))
    from_env = getattr(Settings(), name)
    assert from_flags == from_env != FIELDS[name].default


def test_command_line_beats_environment_and_an_absent_option_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options not given leave the environment's values alone; options given win over them."""
    monkeypatch.setenv("LORALOOM_PORT", "9100")
    monkeypatch.setenv("LORALOOM_WATCH", "false")
    monkeypatch.setenv("LORALOOM_TEXT_ADAPTERS", "/env/a,/env/b")
    monkeypatch.setenv("LORALOOM_LOG_LEVEL", "warning")
    s = parse("--max-seqs", "2")
    assert (s.port, s.watch, s.text_adapters, s.log_level, s.max_seqs) == (
        9100, False, [Path("/env/a"), Path("/env/b")], "warning", 2)
    s = parse("--port", "9200", "--watch", "--text-adapters", "/cli", "--log-level", "debug")
    assert (s.port, s.watch, s.text_adapters, s.log_level) == (9200, True, [Path("/cli")], "debug")
    assert vars(build_parser().parse_args(["serve"])).keys() <= {"command", "func", "config"}


def test_readme_table_is_fresh() -> None:
    """README.md's Configuration table is what `python -m daemon.settings --readme` writes."""
    text = settings_module.README.read_text(encoding="utf-8")
    assert update_readme(text) == text, "run `python -m daemon.settings --readme`"
    for name in FIELDS:
        assert f"| `{name}` |" in text
    assert settings_module.main(["--check"]) == 0


def test_serve_help_shows_every_group_and_every_default(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`loraloom serve --help` lists the groups, and each option with its meaning and default."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for group, _ in groups():
        assert f" {group}: " in text, group
    for name, field in FIELDS.items():
        repeatable = "repeatable; " if typing.get_origin(field.annotation) is list else ""
        expected = f"{field.description} ({repeatable}default: {default_text(name)})".replace("`", "'")
        assert expected in text, name
    assert "--watch, --no-watch" in text and "--kernels, --no-kernels" in text
    assert "--log-level {debug,info,warning,error}" in text
