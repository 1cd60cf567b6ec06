"""Triton kernel of the Walsh–Hadamard transform (docs/design.md §7).

Kronecker decomposition: with N = P·Q, H_N = H_P ⊗ H_Q, so for a row viewed as
the P×Q row-major matrix X, H_N x = vec(H_P X H_Q) (H is symmetric). A tile
kernel loads an A×B matrix whose element (a, b) sits at base + a·stride_a + b
and multiplies it by small Hadamard matrices built in registers,
H[i, j] = (−1)^popcount(i & j), on the side(s) asked for:

- pass 1 (low bits): contiguous tiles of A·B ≤ 4096 elements, Y = H_A X H_B;
- pass 2 (high bits, rows longer than one tile): the row is a (N/T)×T matrix
  (T = A·B), and tiles of (N/T)×BLOCK columns get Y = H_{N/T} X.

Two passes cover N ≤ 2^19 (2^17 needs 2^12 × 2^5). Products use tl.dot with
input_precision="ieee" (exact fp32 products; TF32 would round x) when both
sides are ≥ 16, and a broadcast multiply-sum for smaller factors. Cost per
element: A + B multiply-adds in pass 1, N/T in pass 2; memory: one read and
one write per pass. Inputs of any float dtype are loaded and converted to the
output dtype (float32 or float64), which is the compute dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_LOG2 = 12  # pass-1 tile: 2^12 elements (64 × 64)
MAX_LOG2 = 19  # two passes: pass 2 factor up to 2^7
TILE_ELEMENTS = 4096  # pass-2 tile: (N/T) × BLOCK values; the broadcast product (N/T)²·BLOCK


@triton.jit
def _hadamard(P: tl.constexpr, dtype: tl.constexpr):
    """The P×P Sylvester matrix, P ≤ 256: sign = parity of the low 8 bits of i & j."""
    i = tl.arange(0, P)[:, None]
    j = tl.arange(0, P)[None, :]
    p = i & j
    p ^= p >> 4
    p ^= p >> 2
    p ^= p >> 1
    return (1 - 2 * (p & 1)).to(dtype)


@triton.jit
def _fwht_tile_kernel(src, dst, n, tile_step, stride_a, scale, A: tl.constexpr, B: tl.constexpr,
                      LEFT: tl.constexpr, RIGHT: tl.constexpr, SCALE: tl.constexpr):
    # program (row, tile): the A×B tile at row·n + tile·tile_step + a·stride_a + b.
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs = row * n + tile * tile_step + tl.arange(0, A)[:, None] * stride_a + tl.arange(0, B)[None, :]
    dtype = dst.dtype.element_ty
    x = tl.load(src + offs).to(dtype)
    if RIGHT:  # X H_B
        h_b = _hadamard(B, dtype)
        if A >= 16 and B >= 16:
            x = tl.dot(x, h_b, input_precision="ieee", out_dtype=dtype)
        else:
            x = tl.sum(x[:, :, None] * h_b[None, :, :], axis=1)
    if LEFT:  # H_A X
        h_a = _hadamard(A, dtype)
        if A >= 16 and B >= 16:
            x = tl.dot(h_a, x, input_precision="ieee", out_dtype=dtype)
        else:
            x = tl.sum(h_a[:, :, None] * x[None, :, :], axis=1)
    if SCALE:
        x = x * scale
    tl.store(dst + offs, x.to(dtype))


def _split(log2: int) -> tuple[int, int]:
    """A·B = 2^log2 with A ≤ B as balanced as possible."""
    return 1 << (log2 // 2), 1 << (log2 - log2 // 2)


def fwht_triton(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    """dst ← scale · H_N src over the last dim. src: contiguous, any float dtype;
    dst: contiguous float32/float64 of the same shape, on the same device (may
    be src). N = 2^L ≤ 2^19."""
    n = src.shape[-1]
    L = n.bit_length() - 1
    if L > MAX_LOG2:
        raise ValueError(f"the triton fwht supports N ≤ 2^{MAX_LOG2}, got N = {n}")
    rows = src.numel() // n
    l1 = min(L, TILE_LOG2)
    a, b = _split(l1)
    two_pass = L > l1
    _fwht_tile_kernel[(rows, n >> l1)](src, dst, n, 1 << l1, b, scale, A=a, B=b, LEFT=True, RIGHT=True,
                                       SCALE=not two_pass and scale != 1.0)
    if two_pass:
        p, t = 1 << (L - l1), 1 << l1  # the row as a p × t matrix; H_p on the left
        block = min(t, TILE_ELEMENTS // p if p >= 16 else TILE_ELEMENTS // (p * p))
        _fwht_tile_kernel[(rows, t // block)](dst, dst, n, block, t, scale, A=p, B=block, LEFT=True, RIGHT=False,
                                              SCALE=scale != 1.0)
