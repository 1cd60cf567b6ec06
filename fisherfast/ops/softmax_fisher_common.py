"""What every softmax-Fisher backend shares (docs/design.md §3): the V-chunk
policy, the merge of per-split partial normalizers, and the errors raised for
a non-finite normalizer or a non-finite result (the overflow check of a
half-precision result is ``fisherfast.checks.cast_checked``, shared by every op).
Imported by the public op file and by each backend module; it imports none
of them."""
from __future__ import annotations

import math

import torch

from fisherfast.checks import check_real

# Chunk policy: the per-chunk temporaries hold about CHUNK_ELEMENTS elements
# (4 MiB in float32), and a chunk has at least MIN_CHUNK rows, so each chunk
# is GEMM work enough to hide the fixed cost of its calls; ``chunk=`` overrides.
CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK = 8192
# lm_logsumexp on the cpu backend keeps only the B×C logit tile: a 16 MiB
# budget, so that usual shapes run in one or two chunks (each chunk wakes the
# GEMM's thread team again, which costs milliseconds on a loaded machine).
LSE_CHUNK_ELEMENTS = 1 << 22
# Accuracy: a float32 sum over n terms carries up to ~n·ε of rounding (ε =
# 6e-8); real heads (a shared mean direction, thousands of comparable p_v)
# show it as 1e-4 over a whole-vocabulary chunk. So every float32 reduction
# over V runs over blocks of at most REDUCTION_BLOCK rows (the contraction
# GEMMs' reduction length, or a fixed block inside the C++/Triton sweeps) and
# the blocks are added into float64 (or compensated) accumulators: the error
# is then a few ε·log(V), whatever the chunk length.
REDUCTION_BLOCK = 4096
# The GPU kernels (Triton, CUDA) sum sequentially within a split of V: a split
# covers at most SPLIT_ROWS rows, and the splits' partial sums are added in
# float64 on the host (``merge_splits``, ``sum_splits``). Splits whose partials
# are large (matmat's (B, d, k) per split) are launched over V-slices of at
# most PARTIAL_ELEMENTS partial entries each, summed in float64 between launches.
SPLIT_ROWS = 1024
PARTIAL_ELEMENTS = 1 << 24


def chunk_size(V: int, per_row: int, chunk: int | None, budget: int = CHUNK_ELEMENTS) -> int:
    """V-chunk length: ``chunk`` if given, else ``budget / per_row`` rows (at least MIN_CHUNK)."""
    if chunk:
        return min(chunk, V)
    return min(V, max(MIN_CHUNK, budget // max(per_row, 1)))


def reduction_chunk(C: int, dtype: torch.dtype) -> int:
    """The V-chunk of a float32 contraction over V: at most REDUCTION_BLOCK rows
    (float64 runs whole chunks)."""
    return C if dtype == torch.float64 else min(C, REDUCTION_BLOCK)


def check_softcap(softcap) -> None:
    """softcap: None, or a positive finite float c (logits become c·tanh(z/c))."""
    if softcap is None:
        return
    check_real("softcap", softcap, minimum=0.0, min_open=True, optional=True)


def cap_logits(Z: torch.Tensor, softcap: float | None):
    """(z′, s) for logits Z: z′ = c·tanh(z/c) and s = dz′/dz = 1 − tanh²(z/c) =
    cosh⁻²(z/c) (no cancellation near |tanh| = 1; cosh overflow gives s = 0,
    the right limit); softcap None gives (Z, None). −inf logits stay −inf
    (masked, s = 0)."""
    if softcap is None:
        return Z, None
    x = Z / softcap
    return torch.where(Z == -math.inf, Z, softcap * torch.tanh(x)), torch.cosh(x).pow(-2)


def split_shape(n_rows: int, rows: int) -> tuple[int, int]:
    """(rows per split, splits) for ``n_rows`` rows: at most ``rows`` and at most SPLIT_ROWS per split."""
    per = max(1, min(rows, SPLIT_ROWS))
    return per, -(-n_rows // per)


def v_slices(V: int, rows_per_split: int, partial_per_split: int):
    """(v0, v1) slices of V for launches whose partials (``partial_per_split``
    elements per split) stay within PARTIAL_ELEMENTS."""
    splits = max(1, PARTIAL_ELEMENTS // max(partial_per_split, 1))
    step = rows_per_split * splits
    return [(v0, min(V, v0 + step)) for v0 in range(0, V, step)]


def merge_splits(M: torch.Tensor, L: torch.Tensor, S: torch.Tensor | None = None):
    """Merge per-split partial normalizers into one per token (in float64).

    M, L: (splits, B) running max m_s and mass l_s = Σ_{v∈s} e^{z_v − m_s};
    S: optional (splits, B, K) sums Σ_{v∈s} e^{z_v − m_s} y_v. Returns
    (m, log l, ȳ = s / l or None) in M's dtype, with m = max_s m_s and every
    split rescaled by e^{m_s − m} (flash-attention merge). A NaN in any
    split's max makes m NaN, so the caller's normalizer check sees it."""
    dt = M.dtype
    m = M.max(dim=0).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    scale = torch.exp((M - m_safe).double())
    l = (L.double() * scale).sum(dim=0)
    m = torch.where(torch.isnan(M).any(dim=0), torch.full_like(m, math.nan), m)
    ybar = None if S is None else ((S.double() * scale[:, :, None]).sum(dim=0) / l[:, None]).to(dt)
    return m, torch.log(l).to(dt), ybar


def raise_nonfinite_normalizer(lse: torch.Tensor, from_logits: bool) -> None:
    """Raise if any token's normalizer is NaN/±Inf (checked after the pass over V)."""
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        tokens = torch.nonzero(bad).flatten()[:8].tolist()
        source = "logits" if from_logits else "W or b (a was checked finite)"
        raise ValueError(f"non-finite softmax normalizer for token(s) {tokens}: {source} contain NaN or +Inf, "
                         f"or every logit of the token is -Inf")


def raise_nonfinite_result(out: torch.Tensor, from_logits: bool) -> None:
    """A finite normalizer can still meet an Inf row of W whose logit is −Inf
    (p = 0, 0·Inf = NaN); this O(output) check catches that."""
    if not bool(torch.isfinite(out).all()):
        source = "logits or W" if from_logits else "W or b (a was checked finite)"
        raise ValueError(f"non-finite result: {source} contain NaN or Inf")
