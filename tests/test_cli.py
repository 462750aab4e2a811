"""The `specmq` console script: every subcommand documents itself with an example; bad input fails in one line."""
import subprocess
import sys

import pytest

from specmq.cli import COMMANDS, main


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"specmq {name}" in out and "example:" in out


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_a_one_line_error(capsys):
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert "unknown command" in err and err.count("\n") == 1


@pytest.mark.slow
def test_bad_config_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "broker.yaml"
    bad.write_text("frontend: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "specmq.cli", "broker", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "not valid YAML" in proc.stderr and proc.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_unknown_config_key_is_named(tmp_path):
    cfg = tmp_path / "broker.yaml"
    cfg.write_text("no_such_option: 3\n")
    proc = subprocess.run([sys.executable, "-m", "specmq.cli", "broker", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no_such_option" in proc.stderr


@pytest.mark.parametrize("command,config", [("broker", "broker.yaml"), ("target", "target.yaml"),
                                            ("target", "target-cuda.yaml"), ("fused", "fused.yaml"),
                                            ("draft", "draft.yaml")])
def test_shipped_configs_name_only_real_flags(command, config):
    """Every key of a shipped command config is one of that command's flags (a typo would fail at startup)."""
    import argparse
    import importlib
    from pathlib import Path

    from specmq.cli import COMMANDS
    from specmq.cliutil import apply_config

    path = Path(__file__).resolve().parents[1] / "configs" / config
    parser = argparse.ArgumentParser(prog="specmq")
    importlib.import_module(COMMANDS[command][0]).register(parser.add_subparsers(dest="command", required=True))
    args = apply_config(parser.parse_args([command, "--config", str(path)]), set())
    if config == "target-cuda.yaml":
        assert (args.device, args.dtype, args.backend, args.capture) == ("cuda", "bfloat16", "cuda", True)


def test_broker_flags_config_keys_and_fields_are_one_set_of_names():
    """Every ``specmq broker`` flag is a ``BrokerConfig`` field of the same name, and the shipped YAML's keys too."""
    import argparse
    from dataclasses import fields
    from pathlib import Path

    import yaml

    from broker.state import BrokerConfig
    from specmq.cliutil import apply_config
    from specmq.commands.broker import config_from_args, register

    parser = argparse.ArgumentParser(prog="specmq")
    register(parser.add_subparsers(dest="command", required=True))
    names = {f.name for f in fields(BrokerConfig)}
    path = Path(__file__).resolve().parents[1] / "configs" / "broker.yaml"
    args = apply_config(parser.parse_args(["broker", "--config", str(path), "--hwm", "7"]), {"hwm"})
    flags = set(vars(args)) - {"config", "log_level", "func", "_parser", "command"}
    assert flags <= names, flags - names
    assert set(yaml.safe_load(path.read_text())) <= names
    config = config_from_args(args)
    assert config.hwm == 7 and config.session_idle_s == 300.0


def test_a_library_failure_prints_as_one_line_like_a_command_error(capsys, monkeypatch):
    """Library code raises ``protocol.errors.SpecmqError`` (never the CLI's own error): the CLI prints it as one line."""
    import argparse

    from protocol.errors import SpecmqError
    from specmq.cliutil import CommandError, run_command

    def fail(args: argparse.Namespace) -> int:
        raise SpecmqError("the model directory is missing")

    monkeypatch.setattr(sys, "argv", ["specmq", "x"])
    parser = argparse.ArgumentParser(prog="specmq")
    args = argparse.Namespace(command="x", func=fail, _parser=parser, config=None, log_level="error")
    assert run_command(args) == 1
    assert capsys.readouterr().err == "specmq x: the model directory is missing\n"
    assert issubclass(CommandError, SpecmqError)
