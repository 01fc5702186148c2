"""What every ``python -m snapvit_lightning.benchmarks.X`` script's ``--help`` tells a user."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys

import pytest

import snapvit_lightning.benchmarks as benchmarks

SCRIPTS = sorted(
    name for _, name, _ in pkgutil.iter_modules(benchmarks.__path__)
    if hasattr(importlib.import_module(f"{benchmarks.__name__}.{name}"), "main")
)


class _Parsed(Exception):
    """Raised in place of parsing: carries the script's parser out of its ``main``."""


def _parser_of(name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    def grab(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsed(self)

    # both: scripts that pass unknown arguments on to `snapvit fit` use parse_known_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", grab)
    with pytest.raises(_Parsed) as parsed:
        importlib.import_module(f"{benchmarks.__name__}.{name}").main([])
    return parsed.value.args[0]


def test_the_scripts_are_found() -> None:
    assert {"bench", "job", "search", "slice", "step"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_says_what_it_does_and_its_default(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = _parser_of(name, monkeypatch)
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options
    assert [a.option_strings for a in options if not a.help] == []
    # a default that is a value (not None, [] or a flag's False; 0 is one) must be named
    with_default = [a for a in options if not (a.default is None or a.default is False or a.default == [])
                    and a.default != argparse.SUPPRESS and not a.required]
    assert [a.option_strings for a in with_default if "default" not in a.help] == []
    assert not (parser.description or "").endswith(":")  # a docstring's "::" is not a sentence


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_prints_this_packages_warnings_as_one_line(name: str) -> None:
    # bench's and heldout's printed `/work/main/snapvit_lightning/benchmarks/bench.py:571: the machine is busy ...`
    import inspect

    source = inspect.getsource(importlib.import_module(f"{benchmarks.__name__}.{name}"))
    main_block = source[source.index('if __name__ == "__main__":'):]
    assert "run_as_script(" in main_block or "own_warnings_as(" in source, name


def test_a_scripts_own_warning_is_one_line_and_others_keep_their_form() -> None:
    # a benchmark's warning printed as `/path/to/deploy.py:111: UserWarning: ...` (the `snapvit` commands' form is one line)
    script = (
        "import warnings, snapvit_lightning.benchmarks as b\n"
        "def main():\n"
        "    warnings.warn_explicit('the machine is busy', UserWarning, b.__file__, 1)\n"
        "    warnings.warn_explicit('not ours', UserWarning, 'elsewhere.py', 7)\n"
        "b.run_as_script(main, 'snapvit_lightning.benchmarks.x')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = run.stderr.splitlines()
    assert run.returncode == 0 and lines[0] == "python -m snapvit_lightning.benchmarks.x: warning: the machine is busy"
    assert lines[1] == "elsewhere.py:7: UserWarning: not ours"
