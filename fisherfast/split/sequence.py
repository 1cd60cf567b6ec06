"""The multi-token upper map of ``SplitModel.sequence_logits`` (docs/design.md §5,
multi-token concepts): h at (ℓ, t) edited, blocks ℓ..L-1 run over positions
t..t+n-1 together, the continuation's lower-layer states held fixed (their
keys/values in the upper blocks are recomputed: they depend on h through
attention)."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Tokens y₁…y_n after position t, for logits at positions t..t+n-1.

    Attributes:
        ids: (n,) y₁…y_n (y_n is predicted, never fed in).
        x: (n-1, d) the lower-layer states at layer ℓ of y₁…y_{n-1} (positions
            t+1..t+n-1), fixed: the edit at (ℓ, t) cannot reach below layer ℓ.
        block_kwargs: per upper block, the keyword arguments the model's own
            forward passed it, for the n queries at positions t..t+n-1 against keys 0..t+n-1.
    """

    ids: torch.Tensor
    x: torch.Tensor
    block_kwargs: list


def run_sequence(split, ctx, h: torch.Tensor) -> torch.Tensor:
    """Logits (..., n, V) for checked h (..., d); the caller selects the split's attention for ``ctx``."""
    cont = ctx.continuation
    lead, n, d = h.shape[:-1], cont.ids.shape[0], split.d
    y = h.reshape(-1, 1, d)
    y = torch.cat([y, cont.x[None].expand(y.shape[0], n - 1, d)], dim=1)
    for j in range(len(split._upper)):
        y = split._call_block(j, y, cont.block_kwargs[j])
    return split.head.logits(split._apply_norm(y)).reshape(*lead, n, -1)
