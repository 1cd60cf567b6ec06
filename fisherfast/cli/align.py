"""`fisherfast align`: alignment tables (and a heatmap) of FisherSketch states
written by `fisherfast sketch` (docs/design.md §7)."""
from __future__ import annotations

import os

from fisherfast.cli._args import UsageError, add_command
from fisherfast.cli._files import PLOT, check_output, write_output
from fisherfast.cli._report import COLUMN_NOTES, KIND_LABEL, alignment_table, heatmap
from fisherfast.cli.select import G_NOTE


def register(sub) -> None:
    p = add_command(sub, "align", "alignment tables (+ heatmap) of FisherSketch states")
    p.add_argument("signatures", nargs="+", metavar="SIG", help="files written by `fisherfast sketch` (one spec)")
    p.add_argument("--kind", choices=("joint", "activation", "error", "mean"), default="joint",
                   help="joint: head-Fisher alignment A; activation: S_a; error: S_e; mean: G, the cosine of the "
                        "mean head gradients (first moments)")
    p.add_argument("--debiased", action="store_true", help="U-statistic norms (noisy for small n)")
    p.add_argument("--out", metavar="FILE", help="heatmap of the main table (.png, .pdf or .svg)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an existing plot")
    p.set_defaults(run=run)


def load_states(paths) -> dict:
    """{name: SketchState}, names from the file names; one spec for all, or a
    UsageError naming the files of each spec."""
    from fisherfast.sketch import SketchState

    states, files = {}, {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in states:
            name = path
        if name in states:
            raise UsageError(f"{path} is given twice")
        try:
            states[name] = SketchState.load(path)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load {path}: {err}") from None
        files[name] = path
    specs: dict = {}
    for name, state in states.items():
        specs.setdefault(state.spec, []).append(files[name])
    if len(specs) > 1:
        listing = "; ".join(f"{', '.join(names)}: {spec}" for spec, names in specs.items())
        raise UsageError(f"the states were sketched under different specs and cannot be aligned — {listing}")
    return states


def run(args) -> int:
    from fisherfast.sketch import alignment, marginals

    out = check_output(args.out, PLOT, force=args.force) if args.out else None
    states = load_states(args.signatures)
    try:
        result = alignment(states, kind=args.kind, debiased=args.debiased)
    except ValueError as err:  # e.g. a state with too few samples for the debiased norms
        raise UsageError(str(err)) from None
    label = KIND_LABEL.get(args.kind, "G")
    print(f"{args.kind} alignment{' (debiased)' if args.debiased else ''} of {len(states)} states, "
          f"counts {', '.join(str(s.count) for s in states.values())}")
    tables = [(label, result)]
    if args.kind == "joint" and len(states) > 1:
        S_a, S_e, rho = marginals(states)
        tables += [(name, type(result)(M, None, result.names)) for name, M in (("S_a", S_a), ("S_e", S_e),
                                                                               ("ρ", rho))]
    for name, _ in tables:
        print(COLUMN_NOTES[name] if name in COLUMN_NOTES else G_NOTE)
    for name, table in tables:
        print(alignment_table(table, name))
    if out is None:
        return 0
    written = write_output(out, lambda tmp: heatmap(result, tmp, f"FisherSketch {args.kind} alignment ({label})"),
                           "heatmap")
    if written:
        print(f"heatmap: {args.out}")
    return 0 if written else 1
