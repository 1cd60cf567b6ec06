"""SplitModel.jacobian (reverse mode) and SplitModel.linearize against torch.func.jacrev
of the head input (an independent route: one reverse pass per output, no vmap over a
recorded graph), on tiny float64 models."""
from __future__ import annotations

import pytest
import torch

from fisherfast.split import SplitModel

PROMPT = [5, 3, 5, 8, 9, 7, 9, 3]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_jacobian_and_linearization_match_jacrev(tiny_lm, arch):
    split = SplitModel(tiny_lm(arch, head_scale=10.0, norm_noise=0.1), layer=1)
    ctx = split.context(PROMPT)
    h = ctx.h + 0.1 * torch.randn(split.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    B = torch.func.jacrev(lambda x: split.head_input(ctx, x))(h)                # (d, d), the oracle

    def close(got, want):   # transformers runs norms and the attention softmax in float32: ~1e-7 relative
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))

    close(split.jacobian(ctx, h), B)
    close(split.jacobian(ctx, h, chunk=5), B)
    lin = split.linearize(ctx, h)
    torch.testing.assert_close(lin.a, split.head_input(ctx, h))
    g = torch.Generator().manual_seed(1)
    for k in (1, 3):   # one vector takes a path without vmap
        T = torch.randn(k, split.d, generator=g, dtype=torch.float64)
        close(lin.jvp(T), T @ B.T)
        close(lin.vjp(T), T @ B)
        close(lin.jvp(T, chunk=2), T @ B.T)
    with pytest.raises(ValueError, match="tangents"):
        lin.jvp(torch.zeros(2, split.d + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="cotangents"):
        lin.vjp(torch.zeros(2, split.d))
