"""One settings model, three sources: command line > environment > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cli import _settings_from_args, build_parser


def parse(*argv: str):
    return _settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_sources_and_their_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "loraloom.toml"
    config.write_text('port = 9001\nmax_seqs = 3\ntext_adapters = ["/adapters/a", "/adapters/b"]\n'
                      'allowed_origins = ["http://game.example"]\nlog_level = "debug"\n')
    monkeypatch.delenv("LORALOOM_CONFIG", raising=False)
    monkeypatch.setenv("LORALOOM_MAX_SEQS", "5")
    monkeypatch.setenv("LORALOOM_PINNED_ADAPTERS", "pirate,elf")
    s = parse("--config", str(config), "--port", "0")
    assert s.port == 0  # command line beats the file
    assert s.max_seqs == 5  # environment beats the file
    assert s.text_adapters == [Path("/adapters/a"), Path("/adapters/b")]  # from the file
    assert s.pinned_adapters == ["pirate", "elf"] and s.log_level == "debug"
    assert s.host == "127.0.0.1" and s.image_model == "default"  # defaults


def test_bad_settings_are_refused_with_the_field_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORALOOM_CONFIG", raising=False)
    config = tmp_path / "bad.toml"
    config.write_text("max_seqs = 0\n")
    with pytest.raises(SystemExit, match="max_seqs"):
        parse("--config", str(config))
    with pytest.raises(SystemExit, match="does not exist"):
        parse("--config", str(tmp_path / "missing.toml"))
    config.write_text("colour = 'red'\n")
    with pytest.raises(SystemExit, match="colour"):
        parse("--config", str(config))


def test_kernels_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled kernels are on unless --no-kernels or LORALOOM_KERNELS=false turns them off."""
    monkeypatch.delenv("LORALOOM_CONFIG", raising=False)
    monkeypatch.delenv("LORALOOM_KERNELS", raising=False)
    assert parse().kernels is True
    assert parse("--no-kernels").kernels is False
    monkeypatch.setenv("LORALOOM_KERNELS", "false")
    assert parse().kernels is False
