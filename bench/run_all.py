"""Run every bench/bench_*.py in turn and gather their tables.

Each bench module defines ``main(argv) -> dict`` (it prints its table, writes
bench/results/<name>.json and accepts ``--quick``); this script calls them one
after another in one process, then writes bench/results/summary.md with every
table: the returned dict's "table" if it has one, else a table of its "rows".
A bench that fails is reported in the summary and the exit status, and the
others still run.

    python bench/run_all.py [--quick] [--only NAME ...]

--quick is passed on to every bench (fewer repeats); --only takes bench names
without the prefix, e.g. ``--only fwht metric``.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _harness import RESULTS_DIR, machine_meta, markdown_table  # noqa: E402


def discover() -> dict[str, str]:
    """bench name → path, for every bench/bench_<name>.py."""
    paths = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    return {os.path.basename(p)[len("bench_"):-len(".py")]: p for p in paths}


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(result) -> str:
    result = result or {}
    if result.get("table"):
        return str(result["table"])
    rows = [r for r in result.get("rows", []) if isinstance(r, dict)]
    if not rows:
        return "(no table returned)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return markdown_table(rows, columns)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every bench")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benches (names without bench_)")
    args = parser.parse_args(argv)
    benches = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(benches))
        if unknown:
            parser.error(f"unknown bench(es) {unknown}; available: {sorted(benches)}")
        benches = {name: benches[name] for name in args.only}
    sections, failed = [], []
    for name, path in benches.items():
        print(f"\n=== bench_{name} ===", flush=True)
        start = time.perf_counter()
        try:
            result = _load(name, path).main(["--quick"] if args.quick else [])
            sections.append(f"## {name}\n\n{_table(result)}\n\n_{time.perf_counter() - start:.0f} s_\n")
        except (Exception, SystemExit):  # one broken bench (or bad argv) must not hide the others
            failed.append(name)
            trace = traceback.format_exc()
            print(trace, file=sys.stderr)
            sections.append(f"## {name}\n\nFAILED:\n\n```\n{trace}\n```\n")
    meta = machine_meta()
    header = (f"# fisherfast benches\n\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"torch {meta['torch']}, {meta['cpu_count']} CPUs ({meta['torch_threads']} torch threads), "
              f"GPU: {meta['cuda_device']}{', quick' if args.quick else ''}\n")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, "summary.md")
    with open(path, "w") as f:
        f.write(header + "\n" + "\n".join(sections))
    print(f"\nwrote {path}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
