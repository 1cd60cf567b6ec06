"""`fisherfast select`: candidate source tasks ranked by head-Fisher alignment
with a target task (docs/design.md §7; FisherSketch's source selection), from
states written by `fisherfast sketch`."""
from __future__ import annotations

import math

from fisherfast.cli._args import UsageError, add_command
from fisherfast.cli._report import COLUMN_NOTES


G_NOTE = ("G    cosine of the mean head gradients (first moments) with the target's; — for a state "
          "saved before the first moment")


def register(sub) -> None:
    p = add_command(sub, "select", "rank candidate source tasks by head-Fisher alignment with a target")
    p.add_argument("target", metavar="TARGET", help="the target task's state (.safetensors from `fisherfast sketch`)")
    p.add_argument("candidates", nargs="+", metavar="CANDIDATE", help="candidate source tasks' states (one spec)")
    p.set_defaults(run=run)


def run(args) -> int:
    from fisherfast.cli.align import load_states
    from fisherfast.sketch import rank_sources

    states = load_states([args.target, *args.candidates])
    names = list(states)
    target, candidates = states[names[0]], {name: states[name] for name in names[1:]}
    try:
        ranking = rank_sources(target, candidates)
    except ValueError as err:  # e.g. an empty state
        raise UsageError(str(err)) from None
    print(f"sources for {names[0]} (n = {target.count}), best aligned first; ± one standard error "
          "(random projections and sampling):")
    print("| rank | source | A | S_a | S_e | ρ | G | n |\n|---|---|---|---|---|---|---|---|")
    for s in ranking:
        G = "—" if math.isnan(s.G) else f"{s.G:.3f} ± {s.G_stderr:.3f}"
        print(f"| {s.rank} | {s.name} | {s.A:.3f} ± {s.A_stderr:.3f} | {s.S_a:.3f} ± {s.S_a_stderr:.3f} | "
              f"{s.S_e:.3f} ± {s.S_e_stderr:.3f} | {s.rho:.2f} ± {s.rho_stderr:.2f} | {G} | {s.count} |")
    for s in ranking:
        if s.undefined:
            print(f"{s.name}: A undefined, ranked last: {s.undefined}")
    for note in COLUMN_NOTES.values():
        print(note)
    print(G_NOTE)
    return 0
