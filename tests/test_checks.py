"""fisherfast.checks: every check returns the canonical value, refuses bools as numbers, never
modifies its input, and names the argument in the one style "name: expected …, got …"."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fisherfast.checks import (check_choice, check_contexts, check_finite, check_int, check_points, check_real,
                               check_vector, expected)


def test_expected_formats_values_types_and_tensors():
    assert expected("k", "an int ≥ 1", 0) == "k: expected an int ≥ 1, got 0"
    assert expected("mode", "one of 'a'", "b") == "mode: expected one of 'a', got 'b'"
    assert expected("G", "a tensor", dict) == "G: expected a tensor, got dict"
    assert expected("h", "shape (3,)", torch.zeros(2, dtype=torch.float64)) == \
        "h: expected shape (3,), got a tensor of shape (2,) and dtype torch.float64"
    assert expected("schema", "V = 5", "one over V = 4", raw=True) == "schema: expected V = 5, got one over V = 4"


def test_check_int():
    assert check_int("k", 3, minimum=1) == 3 and type(check_int("k", np.int64(3))) is int
    assert check_int("k", None, optional=True) is None
    for bad in (True, 2.0, "3", None, 0, 6):
        with pytest.raises(ValueError, match=r"^k: expected an int ≥ 1 and ≤ 5, got "):
            check_int("k", bad, minimum=1, maximum=5)
    with pytest.raises(ValueError, match=r"^chunk: expected an int ≥ 1 or None, got 0$"):
        check_int("chunk", 0, minimum=1, optional=True)


def test_check_real():
    assert check_real("x", 2) == 2.0 and type(check_real("x", np.float32(0.5))) is float
    assert check_real("kl", math.inf, minimum=0, min_open=True, finite=False) == math.inf
    for bad in (True, "1", math.nan, math.inf, 0.0, 1.0):
        with pytest.raises(ValueError, match=r"^tol: expected a finite number > 0 and < 1, got "):
            check_real("tol", bad, minimum=0, maximum=1, min_open=True, max_open=True)
    with pytest.raises(ValueError, match=r"^kl: expected a number > 0, got nan$"):
        check_real("kl", math.nan, minimum=0, min_open=True, finite=False)


def test_check_choice_finite_vector_points():
    assert check_choice("solve", "pinv", ("damped", "pinv")) == "pinv"
    with pytest.raises(ValueError, match=r"^solve: expected one of 'damped', 'pinv', got 'x'$"):
        check_choice("solve", "x", ("damped", "pinv"))
    x = torch.tensor([1.0, math.nan])
    with pytest.raises(ValueError, match=r"^x: expected finite values, got NaN or Inf$"):
        check_finite("x", x)
    assert math.isnan(float(x[1]))          # not modified
    v = torch.ones(3)
    assert check_vector("q", v, 3) is v
    with pytest.raises(TypeError, match=r"^q: expected a floating tensor of shape \(d,\), got list$"):
        check_vector("q", [1.0], 3)
    with pytest.raises(ValueError, match=r"^q: expected shape \(4,\)"):
        check_vector("q", v, 4)
    assert check_points("p", torch.ones(3)).shape == (1, 3)
    with pytest.raises(ValueError, match=r"^p: expected shape \(n, d\) with n ≥ 3"):
        check_points("p", torch.ones(2, 3), min_n=3)
    with pytest.raises(TypeError, match=r"^p: expected the model's dtype torch.float64, got torch.float32$"):
        check_points("p", torch.ones(2, 3), 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^p: expected finite values"):
        check_points("p", torch.tensor([[math.inf, 0.0]]), 2, finite=True)


def test_check_contexts(tiny_lm):
    from fisherfast.split import SplitModel

    model = tiny_lm("llama", layers=2)
    split, other = SplitModel(model, layer=1), SplitModel(model, layer=0)
    ctx = split.context([1, 2, 3])
    assert check_contexts(split, ctx) == [ctx]
    with pytest.raises(TypeError, match=r"^contexts: expected a SplitContext or a non-empty list"):
        check_contexts(split, [])
    with pytest.raises(TypeError, match=r"^contexts\[1\]: expected a SplitContext, got str$"):
        check_contexts(split, [ctx, "text"])
    with pytest.raises(ValueError, match=r"^contexts\[0\]: expected a context of this SplitModel"):
        check_contexts(other, [ctx])
