"""Source selection with FisherSketch: rank candidate source tasks by the
alignment of their head Fishers with a target task's (docs/design.md §7).

For each candidate j: the head-Fisher alignment A(target, j), its activation
and error marginals S_a, S_e (alignments of the activation second moments
M_a and of the error second moments Γ_e) and the coupling ρ = A / (S_a S_e)
(1 when a and e are independent within each task), each with its standard
error from ``alignment`` (projection jackknife and, for A, S_a, S_e, the
sampling part; for ρ the joint delete-one-feature jackknife,
``coupling_stderr``). Beside them, G: the cosine of the first moments (the
mean head gradients ḡ = E[e ⊗ a]), so one sees where the first and second
moments disagree. Candidates are ranked by A, largest first.

A candidate whose alignment is undefined (its joint sketch is zero, e.g. a
zero head Fisher: every error e = 0, so A = 0/0) is ranked last, after every
defined one, in the order given, with ``A = nan`` and the reason in
``SourceScore.undefined``; a target whose own sketch is zero is an error.

What the ranking predicts is measured in bench/bench_source_selection.py
(fine-tuning the head on each source and measuring the target's loss).
"""
from __future__ import annotations

import dataclasses
import math

from fisherfast.sketch.alignment import alignment, coupling_stderr
from fisherfast.sketch.state import SketchState, check_nonempty


@dataclasses.dataclass(frozen=True)
class SourceScore:
    """One candidate's scores against the target (float cosines, ± their standard errors).

    Attributes:
        name: the candidate's name; rank: 1 for the best aligned.
        A, A_stderr: head-Fisher alignment with the target.
        S_a, S_a_stderr: activation marginal (second moments of the head inputs).
        S_e, S_e_stderr: error marginal (second moments of e = p − e_y).
        rho, rho_stderr: coupling A / (S_a S_e) (projection part of the error).
        count: the candidate's sample count.
        undefined: why A is undefined (NaN; such candidates rank last), or "".
        G, G_stderr: the first moment's cosine cos(ḡ_target, ḡ_j) of the mean head
            gradients, beside A (NaN when the target or this candidate lacks the first
            moment: a version-1 file).
    """

    name: str
    rank: int
    A: float
    A_stderr: float
    S_a: float
    S_a_stderr: float
    S_e: float
    S_e_stderr: float
    rho: float
    rho_stderr: float
    count: int
    undefined: str = ""
    G: float = math.nan
    G_stderr: float = math.nan


def rank_sources(target: SketchState, candidates) -> list[SourceScore]:
    """Candidates ranked by head-Fisher alignment with ``target``.

    Args:
        target: the target task's SketchState.
        candidates: {name: SketchState} (or a list, named "0", "1", …), all
            under the target's spec.

    Returns:
        list of SourceScore, best aligned first (rank 1).

    Raises:
        TypeError: target not a SketchState, or candidates not states.
        ValueError: no candidates, different specs, empty states, a target
            whose joint sketch is zero (every alignment undefined).
    """
    if not isinstance(target, SketchState):
        raise TypeError(f"target: expected a SketchState, got {type(target).__name__}")
    if isinstance(candidates, dict):
        names, states = [str(k) for k in candidates], list(candidates.values())
    elif isinstance(candidates, (list, tuple)):
        names, states = [str(i) for i in range(len(candidates))], list(candidates)
    else:
        raise TypeError("candidates: expected a {name: SketchState} dict or a list of SketchStates")
    if not states:
        raise ValueError("candidates must hold at least one SketchState")
    if not all(isinstance(s, SketchState) for s in states):
        raise TypeError("every candidate must be a SketchState")
    if target.count == 0:
        raise ValueError("target: expected a state with at least one sample, got an empty one")
    check_nonempty("candidates", names, states)
    if not bool(target.sums["joint"].any()):
        raise ValueError("the target's joint sketch is zero (zero head Fisher: every e = 0), so its alignment "
                         "with any candidate is undefined")
    everything = [target, *states]  # row 0 is the target
    joint, act, err = (alignment(everything, kind=kind) for kind in ("joint", "activation", "error"))
    rho, rho_se = joint.A / (act.A * err.A), coupling_stderr(everything)  # ρ as ``marginals`` defines it
    # G for each candidate that holds the first moment (as the target must): per candidate, so one
    # state without it (a version-1 file) leaves the others' G as they are
    with_mean = [j for j, s in enumerate(states, start=1) if s.has_mean] if target.has_mean else []
    first = alignment([target] + [states[j - 1] for j in with_mean], kind="mean") if with_mean else None
    column = {j: c for c, j in enumerate(with_mean, start=1)}  # candidate j → its row in ``first``
    scores = [dict(name=name, A=float(joint.A[0, j]), A_stderr=float(joint.stderr[0, j]), S_a=float(act.A[0, j]),
                   S_a_stderr=float(act.stderr[0, j]), S_e=float(err.A[0, j]), S_e_stderr=float(err.stderr[0, j]),
                   rho=float(rho[0, j]), rho_stderr=float(rho_se[0, j]), count=state.count,
                   undefined="" if math.isfinite(float(joint.A[0, j])) else
                   "the candidate's joint sketch is zero (zero head Fisher), so A = 0/0",
                   G=float(first.A[0, column[j]]) if j in column else math.nan,
                   G_stderr=float(first.stderr[0, column[j]]) if j in column else math.nan)
              for j, (name, state) in enumerate(zip(names, states), start=1)]
    scores.sort(key=lambda s: (bool(s["undefined"]), -s["A"] if not s["undefined"] else 0.0))  # stable
    return [SourceScore(rank=r, **s) for r, s in enumerate(scores, start=1)]
