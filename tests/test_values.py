from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import random_scores, tiny_model

from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.scores import check_fraction, check_ratio
from snapvit_lightning.values import all_finite, real_number


@pytest.mark.parametrize("value, expected", [
    (0.3, 0.3), (2, 2.0), (np.float32(0.25), 0.25), (np.int64(3), 3.0), (np.array(0.5), 0.5),
    (torch.tensor(0.5), 0.5), (torch.tensor(2), 2.0), (torch.tensor(0.5, dtype=torch.float16), 0.5),
])
def test_real_numbers_are_python_numpy_and_0d_tensor_scalars(value, expected) -> None:
    number = real_number(value)
    assert type(number) is float and number == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_agrees_with_isfinite(dtype) -> None:
    x = torch.randn(7, 5, dtype=dtype)
    assert all_finite(x) and all_finite(x[:0]) and all_finite(torch.arange(4))
    for bad in (math.nan, math.inf, -math.inf):
        for where in ((0, 0), (3, 2), (6, 4)):
            y = x.clone()
            y[where] = bad
            assert all_finite(y) is bool(torch.isfinite(y).all()) is False


@pytest.mark.parametrize("value", [
    True, np.bool_(False), torch.tensor(True), np.array(True), "0.3", None, 1j, torch.tensor([0.5]), np.array([0.5]), [0.5],
    torch.tensor(0.5, device="meta"),
])
def test_bools_strings_and_arrays_are_not_real_numbers(value) -> None:
    assert real_number(value) is None


def test_nan_is_returned_for_the_caller_to_refuse() -> None:
    assert math.isnan(real_number(float("nan"))) and check_ratio(np.float32(0.5), "r") == 0.5
    with pytest.raises(ValueError, match=r"r must be a number in \[0, 1\], got np.float32\(nan\)"):
        check_fraction(np.float32("nan"), "r")


def test_budgets_accept_numpy_and_tensor_scalars() -> None:
    model, _, _ = tiny_model("test_vit")
    elastic = ElasticViT(model, random_scores(model))
    for given in (np.float32(0.5), torch.tensor(0.5), np.float64(0.5)):
        assert elastic.resolve_budget(flops=given) == elastic.resolve_budget(flops=0.5)
        assert elastic.resolve_budget(given, given) == (0.5, 0.5)
        assert elastic.resolve_budget(flops=0.6, head_ratio_scale=given) == elastic.resolve_budget(flops=0.6, head_ratio_scale=0.5)
    with pytest.raises(ValueError, match=r"flops must be a fraction in \(0, 1\], got tensor\(True\)"):
        elastic.resolve_budget(flops=torch.tensor(True))


def test_integer_takes_integers_of_every_kind_and_refuses_bools() -> None:
    import numpy as np
    import torch

    from snapvit_lightning.values import integer

    assert [integer(v) for v in (3, np.int64(3), torch.tensor(3), np.array(3))] == [3, 3, 3, 3]
    assert [integer(v) for v in (True, np.True_, torch.tensor(True), 3.0, "3", torch.tensor(3.0), None)] == [None] * 7
