"""``snapvit_lightning`` itself: its top-level names, imported on first use."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import snapvit_lightning


@pytest.mark.parametrize("name", sorted(snapvit_lightning._API))
def test_every_top_level_name_is_its_modules_own_object(name: str) -> None:
    module = importlib.import_module(f"snapvit_lightning.{snapvit_lightning._API[name]}")
    assert getattr(snapvit_lightning, name) is getattr(module, name)
    assert name in dir(snapvit_lightning) and name in snapvit_lightning.__all__


def test_the_package_imports_nothing_heavy_until_a_name_is_used() -> None:
    code = ("import sys, snapvit_lightning; heavy = [m for m in ('torch', 'timm', 'lightning') if m in sys.modules]; "
            "from snapvit_lightning import ElasticViT; print(heavy, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'snapvit_lightning' has no attribute 'ElasticVit'"):
        snapvit_lightning.ElasticVit  # noqa: B018
    with pytest.raises(ImportError):
        from snapvit_lightning import ElasticVit  # noqa: F401
