"""FisherSketch over many real text domains (issue 21.3): retrieval of held-out
prompts to their domain through a SignatureIndex, and the cost of one domain's
signature against the model's own forward.

Domains (full run): the categories of Debian's ``fortunes`` package (those with
at least --min-items entries), the license texts of /usr/share/common-licenses
(one domain, paragraphs), and packages of the Python standard library's source
(one domain each, blocks of lines). Each domain's items are shuffled (seeded)
and split into --sketch sketching samples and --queries held-out prompts.
Install the packages with

    apt-get update && apt-get install -y fortunes

Without them the full run says so and exits with status 0 (nothing measured);
``--quick`` needs none: a random-init tiny Llama over byte tokens and domains
from the standard library's source only.

Per held-out prompt, its own FisherSketch state (next-token labels at every
position) is the query; the domains are ranked by
  A     head-Fisher alignment (joint signatures; the index's query order)
  G     first moment: cosine of the mean head gradients
  S_a   activation second moment (the activation sketch: all an activation-only
        similarity sees of E[a aᵀ])
  mean-a cosine of the mean head inputs (pooled final hidden states)
and top-1 / top-5 retrieval accuracy is reported against chance (1/D, 5/D).
Cost rows: one domain's samples through the model's own forward (logits over
the vocabulary) and through the signature path (final hidden states + fused
sketch update), same batches, one process; peak tensor memory from the
profiler (bench/_harness.peak_memory). Index rows: query latency of a
SignatureIndex of the D real domains and of 10⁴ synthetic domains (full run).

    python bench/bench_domains.py              # SmolLM2-135M, needs fortunes
    python bench/bench_domains.py --quick      # tiny config, any machine (tests)
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import re
import statistics
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import default_results_path, markdown_table, peak_memory, tiny_llama, write_results  # noqa: E402

FORTUNES = "/usr/share/games/fortunes"
LICENSES = "/usr/share/common-licenses"
STDLIB_PACKAGES = ("asyncio", "email", "json", "unittest", "xml", "http", "logging", "multiprocessing")
INSTALL = "apt-get update && apt-get install -y fortunes"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def fortune_domains(min_items: int) -> dict[str, list[str]]:
    """{fortunes/<category>: entries} for the categories with ≥ min_items entries of ≥ 40 characters."""
    domains = {}
    for path in sorted(glob.glob(os.path.join(FORTUNES, "*"))):
        if os.path.splitext(path)[1] or not os.path.isfile(path):  # skip .dat / .u8 / links to folders
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            entries = [_clean(e) for e in f.read().split("\n%\n")]
        entries = [e for e in entries if len(e) >= 40]
        if len(entries) >= min_items:
            domains[f"fortunes/{os.path.basename(path)}"] = entries
    return domains


def license_domain() -> dict[str, list[str]]:
    paragraphs = []
    for path in sorted(glob.glob(os.path.join(LICENSES, "*"))):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                paragraphs += [_clean(p) for p in f.read().split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p) >= 80]
    return {"licenses": paragraphs} if paragraphs else {}


def stdlib_domains(packages, lines_per_item: int = 12) -> dict[str, list[str]]:
    """{python/<package>: blocks of lines_per_item source lines} from this interpreter's standard library."""
    root = sysconfig.get_paths()["stdlib"]
    domains = {}
    for package in packages:
        blocks = []
        for path in sorted(glob.glob(os.path.join(root, package, "**", "*.py"), recursive=True)):
            if "test" in os.path.relpath(path, root).split(os.sep)[1:]:
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = [line.rstrip() for line in f if line.strip()]
            blocks += ["\n".join(lines[i:i + lines_per_item]) for i in range(0, len(lines), lines_per_item)]
        if blocks:
            domains[f"python/{package}"] = blocks
    return domains


def split_domains(domains: dict, n_sketch: int, n_query: int, seed: int) -> dict[str, tuple[list, list]]:
    """{name: (sketch items, held-out items)}; domains with too few items are dropped."""
    out = {}
    for name, items in domains.items():
        if len(items) < n_sketch + n_query:
            continue
        items = list(items)
        random.Random(f"{seed}/{name}").shuffle(items)
        out[name] = (items[:n_sketch], items[n_sketch:n_sketch + n_query])
    return out


class ByteTokenizer:
    """--quick: token id = 1 + byte mod (V − 1), so any text runs through the tiny model."""

    def __init__(self, V: int):
        self.V = V

    def __call__(self, texts):
        return {"input_ids": [[1 + b % (self.V - 1) for b in t.encode()] for t in texts]}


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    ids = tokenizer(texts)["input_ids"] if isinstance(tokenizer, ByteTokenizer) else \
        tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [x[:max_length] for x in ids if len(x) >= 2]


def head_rows(model, batch: list[list[int]]):
    """Per item (a (T−1, d), y (T−1,)): final normed hidden states and next tokens (one padded forward)."""
    from fisherfast.split import final_head_inputs

    T = max(map(len, batch))
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    a = final_head_inputs(model, ids, mask)
    return [(a[i, :len(x) - 1], ids[i, 1:len(x)]) for i, x in enumerate(batch)]


def sketch_items(model, head, spec, items: list[list[int]], batch_size: int, per_item: bool):
    """One state over all items (per_item False) or one per item; also the mean head input(s)."""
    from fisherfast.sketch import FisherSketcher

    states, means = [], []
    total = FisherSketcher(spec) if not per_item else None
    a_sum, n = 0.0, 0
    for start in range(0, len(items), batch_size):
        for a, y in head_rows(model, items[start:start + batch_size]):
            sketcher = total if total is not None else FisherSketcher(spec)
            sketcher.update(a, W=head.W, b=head.b, y=y)
            if per_item:
                states.append(sketcher.state)
                means.append(a.double().mean(0))
            else:
                a_sum, n = a_sum + a.double().sum(0), n + a.shape[0]
    return (states, means) if per_item else (total.state, a_sum / n)


def cosine_rows(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (M @ v) / (M.norm(dim=1) * v.norm()).clamp_min(1e-300)


def retrieval(index, domain_means: torch.Tensor, names: list[str], queries: dict) -> dict[str, dict]:
    """Top-1 / top-5 accuracy of each similarity over every held-out prompt."""
    mats = index.matrices()
    ranks = {key: [] for key in ("A", "G", "S_a", "mean-a")}
    for true_name, (states, means) in queries.items():
        truth = names.index(true_name)
        for state, mean_a in zip(states, means):
            scores = {
                "A": index.scores(state),
                "G": cosine_rows(mats["mu.mean"].double(), state.sums["mean"].double() / state.count),
                "S_a": cosine_rows(mats["mu.activation"].double(), state.sums["activation"].double() / state.count),
                "mean-a": cosine_rows(domain_means, mean_a),
            }
            for key, s in scores.items():
                s = torch.nan_to_num(s, nan=-2.0)
                ranks[key].append(int((s > s[truth]).sum()))  # 0 = retrieved first
    return {key: {"top1": sum(r == 0 for r in rs) / len(rs), "top5": sum(r < 5 for r in rs) / len(rs),
                  "n": len(rs)} for key, rs in ranks.items()}


def cost_rows(model, head, spec, items, batch_size) -> list[dict]:
    """One domain's samples: the model's own forward (with logits) vs the signature path."""
    def forward():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            T = max(map(len, batch))
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            mask = torch.zeros(len(batch), T, dtype=torch.long)
            for i, x in enumerate(batch):
                ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    def signature():
        sketch_items(model, head, spec, items, batch_size, per_item=False)

    tokens = sum(map(len, items))
    rows = []
    for name, fn in (("model forward (logits)", forward), ("signature (forward to a + sketch)", signature)):
        fn()  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rows.append({"path": name, "tokens": tokens, "median_s": statistics.median(times),
                     "tokens_per_s": tokens / statistics.median(times),
                     "peak_extra_MB": peak_memory(fn) / 2**20})
    rows[1]["vs_forward"] = rows[1]["median_s"] / rows[0]["median_s"]
    return rows


def index_latency(spec, N: int, k: int = 10, seed: int = 0) -> dict:
    """Query latency of a SignatureIndex of N synthetic domains (states with variances)."""
    from fisherfast.sketch import SignatureIndex, SketchState
    from fisherfast.sketch.state import ALL_KINDS

    g = torch.Generator().manual_seed(seed)

    def state(n=200):
        sums = {kind: torch.randn(spec.m, generator=g, dtype=torch.float64) * n for kind in ALL_KINDS}
        return SketchState(spec, n, sums, {kind: v.square() / n + n for kind, v in sums.items()})

    index = SignatureIndex(spec)
    shared = state()
    for i in range(N):
        index.add(f"d{i}", shared if i % 2 else state())
    index.matrices()
    target = state()
    index.query(target, k=k)
    times = {"query_ms": [], "scores_ms": []}
    for _ in range(5):
        start = time.perf_counter()
        index.query(target, k=k)
        times["query_ms"].append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        index.scores(target)
        times["scores_ms"].append(1e3 * (time.perf_counter() - start))
    return {"domains": N, "m": spec.m, "k": k, "index_MB": index.nbytes / 2**20,
            **{key: statistics.median(v) for key, v in times.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random Llama, standard-library domains only")
    p.add_argument("--sketch", type=int, default=None, help="sketching samples per domain (default 16; quick 8)")
    p.add_argument("--queries", type=int, default=None, help="held-out prompts per domain (default 30; quick 4)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per item (default 48; quick 24)")
    p.add_argument("--min-items", type=int, default=60, help="fortune categories with at least this many entries")
    p.add_argument("--max-domains", type=int, default=40)
    p.add_argument("--m", type=int, default=None, help="features (default 4096; quick 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--index-domains", type=int, default=None,
                   help="synthetic domains for the index latency row (default 10,000; quick 200)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = args.quick
    n_sketch = args.sketch or (8 if quick else 16)
    n_query = args.queries or (4 if quick else 30)
    max_length = args.max_length or (24 if quick else 48)
    m = args.m or (256 if quick else 4096)
    torch.manual_seed(args.seed)

    if quick:
        domains = stdlib_domains(STDLIB_PACKAGES[:6], lines_per_item=4)
    else:
        if not os.path.isdir(FORTUNES):
            print(f"skipped: the fortunes package is not installed ({FORTUNES}); install it with: {INSTALL}")
            return None
        domains = {**fortune_domains(args.min_items), **license_domain(), **stdlib_domains(STDLIB_PACKAGES)}
    split = dict(list(split_domains(domains, n_sketch, n_query, args.seed).items())[:args.max_domains])
    from fisherfast.sketch import SignatureIndex, SketchSpec
    from fisherfast.sketch.model import model_head

    if quick:
        model = tiny_llama().float()
        tokenizer, model_name = ByteTokenizer(model.config.vocab_size), "tiny random Llama (V = 61, d = 32)"
    else:
        from fisherfast.models import load_default
        model, tokenizer = load_default()
        model_name = "SmolLM2-135M-Instruct (float32)"
    head = model_head(model)
    K, d = head.W.shape
    spec = SketchSpec(d=d, K=K, m=m, seed=args.seed)
    print(f"{len(split)} domains ({n_sketch} sketching samples + {n_query} held-out prompts each, ≤ {max_length} "
          f"tokens) on {model_name}, m = {m}, {torch.get_num_threads()} thread(s)", flush=True)

    index, means, queries = SignatureIndex(spec), [], {}
    start = time.perf_counter()
    for name, (sketch_texts, query_texts) in split.items():
        state, mean_a = sketch_items(model, head, spec, encode(tokenizer, sketch_texts, max_length),
                                     args.batch_size, per_item=False)
        index.add(name, state)
        means.append(mean_a)
        queries[name] = sketch_items(model, head, spec, encode(tokenizer, query_texts, max_length),
                                     args.batch_size, per_item=True)
    sketch_s = time.perf_counter() - start
    names = index.names
    scores = retrieval(index, torch.stack(means), names, queries)
    D = len(names)
    retrieval_rows = [{"similarity": "chance", "top1": 1 / D, "top5": min(5, D) / D}]
    labels = {"A": "A (head-Fisher alignment)", "G": "G (first moment: mean head gradient)",
              "S_a": "S_a (activation second moment)", "mean-a": "mean-activation cosine"}
    retrieval_rows += [{"similarity": labels[key], **value} for key, value in scores.items()]
    first = next(iter(split.values()))[0]
    cost = cost_rows(model, head, spec, encode(tokenizer, first, max_length), args.batch_size)
    latency = [index_latency(spec, D, k=min(10, D)),
               index_latency(spec, args.index_domains or (200 if quick else 10_000), k=10)]
    table = "\n\n".join([
        markdown_table(retrieval_rows, ["similarity", "top1", "top5"]),
        markdown_table(cost, ["path", "tokens", "median_s", "tokens_per_s", "peak_extra_MB", "vs_forward"]),
        markdown_table(latency, ["domains", "m", "k", "index_MB", "query_ms", "scores_ms"])])
    print(table)
    print(f"(sketching {D} domains and {sum(len(q[0]) for q in queries.values())} prompts took {sketch_s:.0f} s)")
    meta = {"model": model_name, "domains": names, "n_sketch": n_sketch, "n_query": n_query,
            "max_length": max_length, "spec": spec.to_json(), "threads": torch.get_num_threads(), "quick": quick,
            "sketch_seconds": sketch_s}
    name = os.path.splitext(os.path.basename(default_results_path("bench_domains", quick)))[0]
    path = write_results(name, [*retrieval_rows, *cost, *latency], meta, table)
    print(f"wrote {path}")
    return {"retrieval": retrieval_rows, "cost": cost, "latency": latency, "domains": names}


if __name__ == "__main__":
    main()
