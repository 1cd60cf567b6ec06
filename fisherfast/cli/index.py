"""`fisherfast index add/query/list`: a signature index of many domains'
FisherSketch states (docs/design.md §7; ``fisherfast.sketch.SignatureIndex``).

    fisherfast index add INDEX STATE...     append states from `fisherfast sketch` (or merge
                                            other index files); creates INDEX when absent
    fisherfast index query INDEX TARGET     the --k domains best aligned with TARGET's state
    fisherfast index list INDEX             spec, size and the domains: counts, what each holds

Every file is checked before any work: a mistake is one line on stderr and exit
status 2, and INDEX is never touched then. The index file is rewritten
atomically (a reader sees the old or the new index, never half of one).
"""
from __future__ import annotations

import math
import os
import time

from fisherfast.cli._args import UsageError, add_command, positive_int
from fisherfast.cli._files import OutputKind, check_output, safetensors_of_format, write_output


_is_index_file = safetensors_of_format("fisherfast.sketch.index")
INDEX = OutputKind("signature index", (".safetensors",), _is_index_file)


def register(sub) -> None:
    p = add_command(sub, "index", "a signature index of many domains: add states, query top-k, list")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = add_command(actions, "add", "append FisherSketch states (or merge index files) into INDEX")
    add.add_argument("index", metavar="INDEX", help="the index (.safetensors); created when absent")
    add.add_argument("states", nargs="+", metavar="STATE",
                     help="states from `fisherfast sketch` (named by their file names), or index files to merge")
    add.add_argument("--name", help="the domain's name (one STATE only; default: its file name)")
    add.add_argument("--no-variances", action="store_true",
                     help="a new index without the sampling variances (half the size; error bars from the "
                          "random projections only)")
    add.set_defaults(run=run_add, command="index add")  # errors name the action
    query = add_command(actions, "query", "the domains best aligned with a target state")
    query.add_argument("index", metavar="INDEX", help="the index (.safetensors)")
    query.add_argument("target", metavar="TARGET", help="the target's state from `fisherfast sketch` (a domain's "
                                                        "or a single prompt's)")
    query.add_argument("--k", type=positive_int, default=5, help="how many domains to report")
    query.set_defaults(run=run_query, command="index query")  # errors name the action
    show = add_command(actions, "list", "the index's spec, size and domains")
    show.add_argument("index", metavar="INDEX", help="the index (.safetensors)")
    show.set_defaults(run=run_list, command="index list")  # errors name the action


def _load_index(path: str):
    from fisherfast.sketch import SignatureIndex

    try:
        return SignatureIndex.load(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the index {path}: {err}") from None


def _load_state(path: str):
    from fisherfast.sketch import SketchState

    try:
        return SketchState.load(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load {path}: {err}") from None


def _good_name(name: str) -> bool:
    """A domain name SignatureIndex accepts (non-empty, no surrounding spaces)."""
    return bool(name.strip()) and name == name.strip()


def run_add(args) -> int:
    from fisherfast.sketch import SignatureIndex

    out = check_output(args.index, INDEX, force=True, option="INDEX")  # extension, folder, not a foreign file
    if args.name is not None and len(args.states) != 1:
        raise UsageError("--name names one STATE; give one STATE, or let the file names name them")
    if args.name is not None and not _good_name(args.name):
        raise UsageError(f"--name: expected a non-empty name without surrounding spaces, got {args.name!r}")
    sources = []
    for path in args.states:  # every input is read and checked before the index is touched
        if _is_index_file(path):
            sources.append((path, path, _load_index(path)))
            continue
        name = args.name if args.name is not None else os.path.splitext(os.path.basename(path))[0]
        if not _good_name(name):
            raise UsageError(f"STATE {path}: its file name gives the domain name {name!r}; expected a non-empty "
                             f"name without surrounding spaces (give --name)")
        clash = next((other for other, other_name, _ in sources if other_name == name), None)
        if clash is not None:
            raise UsageError(f"STATE {path}: gives the domain name {name!r}, as does STATE {clash}; "
                             f"expected one name per domain (rename a file, or add them one at a time with --name)")
        sources.append((path, name, _load_state(path)))
    exists = os.path.exists(out)
    index = _load_index(args.index) if exists else None
    if index is not None and args.no_variances:
        raise UsageError(f"--no-variances applies to a new index; {args.index} exists "
                         f"({'with' if index.variances else 'without'} variances)")
    if index is None:
        first = sources[0][2]
        index = SignatureIndex(first.spec, variances=not args.no_variances)
    added = 0
    try:
        for path, name, item in sources:
            if isinstance(item, SignatureIndex):
                index = index.merge(item)
                added += len(item)
            else:
                index.add(name, item)
                added += 1
    except ValueError as err:  # another spec, a repeated name, an empty state
        raise UsageError(f"STATE {path}: {err}") from None
    written = write_output(out, index.save, "signature index")
    if written:
        print(f"{'added' if exists else 'created with'} {added} domain{'s' * (added != 1)}: {args.index} holds "
              f"{len(index)} under {index.spec} ({index.nbytes:,} bytes)")
    return 0 if written else 1


def run_query(args) -> int:
    index = _load_index(args.index)
    target = _load_state(args.target)
    if target.spec != index.spec:
        raise UsageError(f"{args.target} was sketched under {target.spec}; the index holds {index.spec}")
    start = time.perf_counter()
    try:
        hits = index.query(target, k=min(args.k, len(index)))
    except ValueError as err:  # an empty index, a zero target
        raise UsageError(str(err)) from None
    elapsed = time.perf_counter() - start
    print(f"domains of {args.index} best aligned with {args.target} (n = {target.count}), of {len(index)}, "
          f"in {elapsed * 1e3:.1f} ms; ± one standard error:")
    print("| rank | domain | A | S_a | S_e | ρ | G | n |\n|---|---|---|---|---|---|---|---|")

    def pm(value, se, digits=3):
        return "—" if math.isnan(value) else f"{value:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")

    for h in hits:
        print(f"| {h.rank} | {h.name} | {pm(h.A, h.A_stderr)} | {pm(h.S_a, h.S_a_stderr)} | "
              f"{pm(h.S_e, h.S_e_stderr)} | {pm(h.rho, h.rho_stderr, 2)} | {pm(h.G, h.G_stderr)} | {h.count} |")
    for h in hits:
        if h.undefined:
            print(f"{h.name}: A undefined, ranked last: {h.undefined}")
    for h in hits:  # what a row lacks is its own ("—"): the other rows keep all their columns
        holds = _holds(index, h.name)
        if holds != "all kinds, with variances":
            print(f"{h.name} holds {holds}" + ("" if index.has_variances(h.name) else
                                                "; its ± is the projection part only"))
    from fisherfast.cli._report import COLUMN_NOTES
    from fisherfast.cli.select import G_NOTE

    for note in COLUMN_NOTES.values():
        print(note)
    print(G_NOTE)
    return 0


def run_list(args) -> int:
    index = _load_index(args.index)
    print(f"{args.index}: {len(index)} domain{'s' * (len(index) != 1)} under {index.spec}, {index.nbytes:,} bytes"
          f"{'' if index.variances else ' (no variances)'}")
    width = max((len(n) for n in index.names), default=0)
    for name, count in zip(index.names, index.counts):
        print(f"  {name:<{width}}  n = {count}  ({_holds(index, name)})")
    return 0


def _holds(index, name: str) -> str:
    """What a domain holds, in words: its kinds and whether it has its sampling variances."""
    kinds = index.kinds(name)
    if kinds == ("joint",) and not index.has_variances(name):
        return "a bare signature (A only)"
    what = "all kinds" if len(kinds) == 4 else "kinds " + ", ".join(kinds)
    return what + (", with variances" if index.has_variances(name) else ", no variances")
