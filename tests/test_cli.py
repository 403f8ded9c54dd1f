"""Every command answers --help, and the groups together register each command once."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from reconciler.cli import build_parser, main


def commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_the_product_commands_exist():
    assert set(commands()) >= {
        "up", "server", "gateway", "pull", "run", "export", "status", "validate", "plan",
        "apply", "render", "bootstrap", "health", "analyze", "monitoring-config", "gpu-exporter",
    }  # fmt: skip


@pytest.mark.parametrize("command", commands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: tensorforge {command}" in capsys.readouterr().out


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "validate" in result.stdout


def test_a_bad_log_level_is_a_usage_error_not_a_traceback(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        main(["--log-level", "bogus", "status"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'bogus' is not one of DEBUG, INFO" in err and "Traceback" not in err
    monkeypatch.setenv("TF_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit):
        main(["status"])
    assert "'loud' is not one of" in capsys.readouterr().err
