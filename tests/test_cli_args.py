"""snapvit_lightning.cli_args: the argument types of the `snapvit` subcommands."""

from __future__ import annotations

import argparse

import pytest

from snapvit_lightning.cli_args import budget_arg


def test_budget_arg_reads_two_ratios() -> None:
    assert budget_arg("0.35,0.2") == (0.35, 0.2) and budget_arg("0,0") == (0.0, 0.0)


@pytest.mark.parametrize("text, match", [
    ("0.35", "budget must be MLP_RATIO,HEAD_RATIO"),
    ("a,b", "budget must be MLP_RATIO,HEAD_RATIO"),
    ("1,0", r"MLP_RATIO must be in \[0, 1\), got 1.0 in '1,0'"),
    ("0.2,-0.1", "HEAD_RATIO must be in"),
    ("nan,0", "MLP_RATIO must be in"),
])
def test_budget_arg_names_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        budget_arg(text)
