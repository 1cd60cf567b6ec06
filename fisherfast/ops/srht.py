"""Subsampled randomized Hadamard transform (docs/design.md §7).

A plan fixes, from its seed alone, the padded size N = 2^⌈log₂ n_in⌉, random
signs D and m gathered output indices. The features are

    srht(x)_j = (H_N D_b x̃)[i_j],     x̃ = x zero-padded to N,

i.e. r_j·x with r_j = D_b H_N e_{i_j}, a ±1 vector, so E[(r_j·x)(r_j·y)] = x·y
for every j. When m > N the plan stacks ⌈m/N⌉ blocks with independent signs
D_b and draws the m indices without replacement from all blocks' outputs, so no
feature repeats. The one-hot case has a closed form (no transform at all):

    (H_N D_b e_y)[i] = D_b[y] · (−1)^popcount(i & y).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch.utils.dlpack import to_dlpack

from fisherfast.ops import _backends
from fisherfast.checks import cast_checked, check_int, check_same_device, check_tensor, compute_dtype
from fisherfast.ops.fwht import fwht


class SRHTPlan:
    """Deterministic random structure of one SRHT: sizes, signs and indices.

    Args:
        n_in: input size (the transform acts on the last dimension).
        m: number of output features.
        seed: the plan is a pure function of (n_in, m, seed).

    Attributes:
        N: padded transform size, the smallest power of two ≥ n_in.
        n_blocks: ⌈m / N⌉ independent sign blocks.
        signs: (n_blocks, N) float32 tensor of ±1 (D).
        idx: (m,) int64 indices into the flattened (n_blocks·N) outputs.
    """

    def __init__(self, n_in: int, m: int, seed: int = 0):
        n_in, m = check_int("n_in", n_in, minimum=1), check_int("m", m, minimum=1)
        seed = check_int("seed", seed, minimum=0)
        self.n_in, self.m, self.seed = n_in, m, seed
        self.N = 1 << (n_in - 1).bit_length()
        self.n_blocks = math.ceil(m / self.N)
        generator = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (self.n_blocks, self.N), generator=generator).float().mul_(2).sub_(1)
        self.idx = torch.randperm(self.n_blocks * self.N, generator=generator)[:m].contiguous()
        self._tensors: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def key(self) -> tuple[int, int, int]:
        return (self.n_in, self.m, self.seed)

    def __eq__(self, other) -> bool:
        return isinstance(other, SRHTPlan) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return f"SRHTPlan(n_in={self.n_in}, m={self.m}, seed={self.seed}; N={self.N}, n_blocks={self.n_blocks})"

    def tensors(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(signs, idx) on ``device``, signs in ``dtype``; cached per (device, dtype) on the plan."""
        key = (torch.device(device), dtype)
        if key not in self._tensors:
            self._tensors[key] = (self.signs.to(device=device, dtype=dtype), self.idx.to(device))
        return self._tensors[key]


def srht_reference(x: torch.Tensor, signs: torch.Tensor, idx: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """Pad, sign, transform (with ``backend``'s fwht), gather.
    x: (R, n_in) contiguous compute-dtype rows; memory (R, n_blocks, N)."""
    n_blocks, n = signs.shape
    padded = x.new_zeros(x.shape[0], n_blocks, n)
    padded[:, :, : x.shape[1]] = x.unsqueeze(1) * signs[:, : x.shape[1]]
    fwht(padded, inplace=True, backend=backend)
    return padded.view(x.shape[0], n_blocks * n).index_select(1, idx)


def srht_cpu(x: torch.Tensor, signs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Fused C++ kernel (csrc/cpu/fwht.cpp): per row and sign block, pad and
    sign into a per-thread scratch row of N, transform there, gather; memory
    (R, m) plus one row of N per thread."""
    out = x.new_empty(x.shape[0], idx.shape[0])
    _backends.cpu_extension().srht(*map(to_dlpack, (x, signs, idx, out)), torch.get_num_threads())
    return out


# Every impl: (x (R, n_in), signs (n_blocks, N) in x's dtype, idx (m,) int64),
# all contiguous on one device, x float32/float64 → (R, m).
_IMPLS = {
    "reference": srht_reference,
    "cpu": srht_cpu,
    "triton": functools.partial(srht_reference, backend="triton"),
    "cuda": functools.partial(srht_reference, backend="cuda"),
}


def _check_op_inputs(x, signs, idx) -> None:
    """x (..., n_in) floating, signs (n_blocks, N) with N ≥ n_in, idx (m,) int64, one device."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("signs", signs, ndim=2)
    check_tensor("idx", idx, ndim=1, float_only=False)
    if idx.dtype != torch.int64:
        raise TypeError(f"idx: expected int64, got {idx.dtype}")
    if signs.shape[1] < x.shape[-1]:
        raise ValueError(f"signs: expected N ≥ n_in = {x.shape[-1]} columns, got shape {tuple(signs.shape)}")
    check_same_device(x=x, signs=signs, idx=idx)


@torch.library.custom_op("fisherfast::srht", mutates_args=())
def _srht_op(x: torch.Tensor, signs: torch.Tensor, idx: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    _check_op_inputs(x, signs, idx)
    impl = _backends.select("srht", _IMPLS, x.device, backend or None)
    rows = x.reshape(-1, x.shape[-1]).to(compute_dtype(x.dtype)).contiguous()
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], idx.shape[0])
    out = impl(rows, signs.to(rows.dtype).contiguous(), idx.contiguous())
    return cast_checked(out.view(*x.shape[:-1], idx.shape[0]), x.dtype, "srht")


@_srht_op.register_fake
def _(x, signs, idx, backend):
    _check_op_inputs(x, signs, idx)
    return x.new_empty(*x.shape[:-1], idx.shape[0])


def _srht_setup_context(ctx, inputs, output):
    x, signs, idx, ctx.backend = inputs
    ctx.save_for_backward(signs, idx)
    ctx.n_in = x.shape[-1]


def _srht_backward(ctx, grad):
    """x̄ = Σ_b [D_b H_N ḡ_b]_{:n_in}, ḡ_b the features' gradients scattered to
    their places in block b (the transpose of gather ∘ H_N ∘ D_b ∘ pad)."""
    signs, idx = ctx.saved_tensors
    n_blocks, n = signs.shape
    g = grad.reshape(-1, idx.shape[0])
    full = g.new_zeros(g.shape[0], n_blocks * n).index_copy_(1, idx, g)
    full = torch.ops.fisherfast.fwht(full.view(-1, n_blocks, n), False, ctx.backend)
    x_bar = (full * signs.to(full.dtype)).sum(1)[:, : ctx.n_in]
    return x_bar.reshape(*grad.shape[:-1], ctx.n_in), None, None, None


_srht_op.register_autograd(_srht_backward, setup_context=_srht_setup_context)


def srht(x: torch.Tensor, plan: SRHTPlan, *, backend: str | None = None) -> torch.Tensor:
    """SRHT features of ``x`` over its last dimension: (..., n_in) → (..., m).

    Each feature is r_j·x with r_j a ±1 vector fixed by ``plan`` (see the module
    docstring); E[srht(x)·srht(y)] = m·(x·y) over the plan's randomness.
    Cost per row: ⌈m/N⌉ transforms of size N. The cpu backend fuses pad, sign,
    transform and gather (memory: the output plus one row of N per thread);
    the others materialize the padded (..., ⌈m/N⌉, N) tensor."""
    if not isinstance(plan, SRHTPlan):
        raise TypeError(f"plan: expected an SRHTPlan, got {type(plan).__name__}")
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] != plan.n_in:
        raise ValueError(f"x.shape[-1] must equal plan.n_in = {plan.n_in}, got {x.shape[-1]}")
    signs, idx = plan.tensors(x.device)
    return torch.ops.fisherfast.srht(x, signs, idx, backend)


def parity(v: torch.Tensor) -> torch.Tensor:
    """popcount(v) mod 2 for non-negative int64 tensors (XOR folding)."""
    for shift in (32, 16, 8, 4, 2, 1):
        v = v ^ (v >> shift)
    return v & 1


def srht_onehot(y: torch.Tensor, plan: SRHTPlan, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """srht(e_y) for integer labels y (any shape) in closed form: (..., m).

    (H_N D_b e_y)[i] = D_b[y] · (−1)^popcount(i & y); no transform is run."""
    if not isinstance(plan, SRHTPlan):
        raise TypeError(f"plan: expected an SRHTPlan, got {type(plan).__name__}")
    check_tensor("y", y, float_only=False)
    if y.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"y: expected an int32/int64 tensor of labels, got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= plan.n_in):
        raise ValueError(f"y must hold labels in [0, {plan.n_in}), got range [{int(y.min())}, {int(y.max())}]")
    signs, idx = plan.tensors(y.device, dtype)
    block, i = idx // plan.N, idx % plan.N
    y = y.long().unsqueeze(-1)
    d_y = signs[block, y]  # (..., m): D_b[y] for each feature's block
    return d_y * (1 - 2 * parity(i & y)).to(dtype)
