"""Packaging and the dispatcher: every subcommand's usage names `flexattn-jax COMMAND`, and the benchmarks are
not installed as a top-level package but run from the source checkout."""

import contextlib
import io
import sys
import tomllib
from pathlib import Path

import pytest

from flexattn_jax.app import cli

ROOT = Path(__file__).resolve().parents[1]


def _help(argv: list[str]) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0, err.getvalue()
    return out.getvalue()


@pytest.mark.parametrize("argv", [[c] for c in cli._DELEGATES] + [["convert", "export"], ["bench", "throughput"]],
                         ids=lambda a: " ".join(a))
def test_every_subcommand_usage_names_the_program(argv):
    text = _help(argv)
    assert text.startswith(f"usage: flexattn-jax {' '.join(argv)} "), text.splitlines()[0]


def test_bench_is_not_an_installed_top_level_package():
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert not [p for p in found.get("include", []) if p.split("*")[0].split(".")[0] == "bench"], found
    assert cli.SOURCE_ROOT == ROOT and cli.source_package("bench") is None and str(ROOT) in sys.path


def test_bench_without_a_source_checkout_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "SOURCE_ROOT", tmp_path)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "source checkout" in err and "pip install -e ." in err
