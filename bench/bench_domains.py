"""FisherSketch over many real text domains (issue 21.3): retrieval of held-out
prompts to their domain through a SignatureIndex, source selection against
head-only fine-tuning transfer (with bergson's ranking beside), and the cost of
one domain's signature against the model's own forward.

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

Source selection over all D·(D−1) (source, target) pairs: domain t's first
--targets held-out prompts are a target task, every other domain's sketching
samples a candidate source. Ground truth: head-only fine-tuning transfer
(bench/head_transfer.py: --steps normalized gradient steps of Frobenius length
--step on the source's next-token loss, then the drop of the target's loss).
Scored by A (target state against the index), G, S_a, mean-a, and — when a
Python with bergson is given (its own environment: it asks for torchvision
and torchaudio, which the pinned CPU torch does not take) — bergson's ranking:
the cosine of mean projected per-example gradients of every linear layer but
the head (`bergson build --projection_dim 16`, its defaults otherwise: each
example's loss summed over its tokens, so longer items weigh more in a domain's
mean, where A weighs every token alike).
Reported per similarity: mean Spearman with transfer over targets (± stderr),
top-1 (picks the best-transfer source; chance 1/(D−1)) and mean regret
(best transfer − picked source's transfer).

    python bench/bench_domains.py              # SmolLM2-135M, needs fortunes
    python bench/bench_domains.py --bergson-python /path/to/venv/bin/python
    python bench/bench_domains.py --quick      # tiny config, any machine (tests)
"""
from __future__ import annotations

import argparse
import functools
import glob
import importlib.util
import os
import random
import re
import statistics
import sys
import sysconfig
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import default_results_path, markdown_table, peak_memory, tiny_llama, write_results  # noqa: E402
from head_transfer import finetune_head, mean_cross_entropy  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

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


def item_rows(model, items: list[list[int]], batch_size: int):
    """Per item (a (T−1, d), y (T−1,)), one padded forward per batch (a generator: batches stream)."""
    for start in range(0, len(items), batch_size):
        yield from head_rows(model, items[start:start + batch_size])


def sketch_rows(head, spec, rows, per_item: bool):
    """One state over all rows (per_item False) or one per item; also the mean head input(s)."""
    from fisherfast.sketch import FisherSketcher

    states, means = [], []
    total = FisherSketcher(spec) if not per_item else None
    a_sum, n = 0.0, 0
    for a, y in rows:
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


def similarities(index, domain_means: torch.Tensor, state, mean_a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each indexed domain's similarity to one target (a state and its mean head input): (D,) per key."""
    mats = index.matrices()
    return {
        "A": index.scores(state),
        "G": cosine_rows(mats["mu.mean"].double(), state.sums["mean"].double() / state.count),
        "S_a": cosine_rows(mats["mu.activation"].double(), state.sums["activation"].double() / state.count),
        "mean-a": cosine_rows(domain_means, mean_a),
    }


def retrieval(index, domain_means: torch.Tensor, names: list[str], queries: dict) -> dict[str, dict]:
    """Top-1 / top-5 accuracy of each similarity over every held-out prompt."""
    ranks = {key: [] for key in ("A", "G", "S_a", "mean-a")}
    for true_name, (states, means) in queries.items():
        truth = names.index(true_name)
        for state, mean_a in zip(states, means):
            for key, s in similarities(index, domain_means, state, mean_a).items():
                s = torch.nan_to_num(s, nan=-float("inf"))
                ranks[key].append(int((s >= s[truth]).sum()) - 1)  # 0 = retrieved first; ties and NaN count against
    return {key: {"top1": sum(r == 0 for r in rs) / len(rs), "top5": sum(r < 5 for r in rs) / len(rs),
                  "n": len(rs)} for key, rs in ranks.items()}


def transfer_matrix(head, sources: list, targets: list, steps: int, step: float) -> torch.Tensor:
    """T[s, t] = L_t(W₀) − L_t(W_s): W_s fine-tunes the head on source s (head_transfer.finetune_head);
    sources and targets are lists of (a, y). The diagonal (a domain onto its own held-out prompts) is kept."""
    W0 = head.W.detach()
    b = None if head.b is None else head.b.detach()
    base = [mean_cross_entropy(W0, b, a, y) for a, y in targets]
    T = torch.empty(len(sources), len(targets), dtype=torch.float64)
    for i, (a_s, y_s) in enumerate(tqdm(sources, desc=f"transfer at step {step:g}", leave=False)):
        W = finetune_head(W0, b, a_s, y_s, steps, step)
        T[i] = torch.tensor([base_t - mean_cross_entropy(W, b, a, y) for base_t, (a, y) in zip(base, targets)])
    return T


def selection_summary(T: torch.Tensor, scores: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per similarity, over targets t (sources s ≠ t): Spearman of score[s, t] with T[s, t], top-1 (the
    highest-scored source is the best-transfer source) and the regret T[best, t] − T[picked, t] (≥ 0)."""
    from scipy.stats import spearmanr

    D = T.shape[0]
    out = {}
    for key, S in scores.items():
        rhos, hits, regrets = [], [], []  # rho is NaN where a score or the transfer is constant over sources
        for t in range(D):
            others = [s for s in range(D) if s != t]
            transfer, score = T[others, t], torch.nan_to_num(S[others, t], nan=-2.0)
            constant = min(transfer.unique().numel(), score.unique().numel()) < 2
            rhos.append(float("nan") if constant else float(spearmanr(transfer.numpy(), score.numpy()).statistic))
            picked, best = int(score.argmax()), int(transfer.argmax())
            hits.append(picked == best)
            regrets.append(float(transfer[best] - transfer[picked]))
        defined = [rho for rho in rhos if rho == rho]
        out[key] = {"spearman": statistics.fmean(defined) if defined else float("nan"),
                    "spearman_stderr": statistics.stdev(defined) / len(defined) ** 0.5 if len(defined) > 1
                    else float("nan"), "spearman_targets": len(defined),
                    "top1": sum(hits) / D, "regret": statistics.fmean(regrets)}
    return out


def bergson_cosines(python: str, model_dir: str, token_ids: dict, projection: int, workdir: str):
    """The peer's ranking: EleutherAI bergson (`bergson build`, per-module random projection of every
    linear layer's per-example gradient but the head's, its defaults otherwise) over each domain's
    sources and target prompts, run in ``python`` (its own environment: bergson asks for torchvision and
    torchaudio). Returns (C (D, D) with C[s, t] = cosine of source s's and target t's mean projected
    gradients, {seconds, tokens, bytes per example})."""
    import json
    import subprocess

    import numpy as np

    data, owner = os.path.join(workdir, "domains.jsonl"), []
    with open(data, "w") as f:
        for i, (source, target) in enumerate(token_ids.values()):
            for part, items in (("source", source), ("target", target)):
                for ids in items:
                    f.write(json.dumps({"input_ids": ids}) + "\n")
                    owner.append((i, part))
    run = os.path.join(workdir, "bergson_index")
    start = time.perf_counter()
    done = subprocess.run([python, "-m", "bergson", "build", run, "--model", model_dir, "--dataset", data,
                           "--projection_dim", str(projection), "--precision", "fp32", "--overwrite", "true"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"bergson build failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(run, "info.json")) as f:
        info = json.load(f)
    G = torch.from_numpy(np.array(np.memmap(os.path.join(run, "gradients.bin"), dtype=np.dtype(info["base_dtype"]),
                                            mode="r", shape=(info["num_grads"], sum(info["grad_sizes"].values())))))
    D = len(token_ids)
    means = {part: torch.stack([G[[j for j, o in enumerate(owner) if o == (i, part)]].double().mean(0)
                                for i in range(D)]) for part in ("source", "target")}
    unit = {part: M / M.norm(dim=1, keepdim=True) for part, M in means.items()}
    tokens = sum(len(ids) for pair in token_ids.values() for items in pair for ids in items)
    return unit["source"] @ unit["target"].T, {"seconds": seconds, "tokens": tokens,
                                                "bytes_per_example": G.shape[1] * G.element_size()}


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
        sketch_rows(head, spec, item_rows(model, items, batch_size), per_item=False)

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


# Gemma-3-270M's text config (google/gemma-3-270m): V = 262,144, d = 640. Not embedded; the --gemma3-shape cost
# rows use a random-init model of this shape (time and memory do not depend on the weights).
GEMMA3_270M = dict(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                   query_pre_attn_scalar=256, max_position_embeddings=32_768)
GEMMA3_TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=8, sliding_window=16, query_pre_attn_scalar=8,
                   max_position_embeddings=128)


def gemma3_shaped_model(shape: dict, seed: int):
    """A random-init float32 Gemma3ForCausalLM of the given text-config shape (eager attention)."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.Gemma3TextConfig(**shape)
    config._attn_implementation = "eager"
    return tf.Gemma3ForCausalLM(config).float().eval().requires_grad_(False)


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


def gemma3_cost(args, split, max_length: int, m: int, quick: bool) -> dict:
    """--gemma3-shape: one domain's signature against the forward at V = 262,144 (tokens from SmolLM2's
    tokenizer, or bytes with --quick: only their count matters here)."""
    from fisherfast.sketch import SketchSpec
    from fisherfast.sketch.model import model_head

    if quick:
        tokenizer = ByteTokenizer(GEMMA3_TINY["vocab_size"])
    else:
        from fisherfast.models import load_default
        _, tokenizer = load_default()
    shape = GEMMA3_TINY if quick else GEMMA3_270M
    model = gemma3_shaped_model(shape, args.seed)
    head = model_head(model)
    spec = SketchSpec(d=shape["hidden_size"], K=shape["vocab_size"], m=m, seed=args.seed)
    items = encode(tokenizer, next(iter(split.values()))[0], max_length)
    print(f"cost rows only: random-init Gemma-3 (V = {shape['vocab_size']:,}, d = {shape['hidden_size']}), "
          f"{len(items)} samples of {next(iter(split))}, m = {m}, {torch.get_num_threads()} thread(s)", flush=True)
    cost = cost_rows(model, head, spec, items, args.batch_size)
    table = markdown_table(cost, ["path", "tokens", "median_s", "tokens_per_s", "peak_extra_MB", "vs_forward"])
    print(table)
    meta = {"model": f"random-init Gemma-3 of shape {shape}", "spec": spec.to_json(), "max_length": max_length,
            "threads": torch.get_num_threads(), "quick": quick}
    name = os.path.splitext(os.path.basename(default_results_path("bench_domains_gemma3_shape", quick)))[0]
    print(f"wrote {write_results(name, cost, meta, table)}")
    return {"cost": cost, "shape": shape}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random Llama, standard-library domains only")
    p.add_argument("--sketch", type=int, default=None, help="sketching samples per domain (default 16; quick 8)")
    p.add_argument("--queries", type=int, default=None, help="held-out prompts per domain (default 30; quick 4)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per item (default 48; quick 24)")
    p.add_argument("--min-items", type=int, default=60, help="fortune categories with at least this many entries")
    p.add_argument("--max-domains", type=int, default=40, help="at most this many domains (≥ 3; default 40)")
    p.add_argument("--m", type=int, default=None, help="features (default 4096; quick 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--index-domains", type=int, default=None,
                   help="synthetic domains for the index latency row (default 10,000; quick 200)")
    p.add_argument("--targets", type=int, default=None,
                   help="held-out prompts that make each domain's target task for source selection (default 8; "
                        "quick 2)")
    p.add_argument("--steps", type=int, default=None, help="head fine-tuning steps per source (default 10; quick 3)")
    p.add_argument("--step", type=float, nargs="+", default=[0.01, 0.03],
                   help="Frobenius length of each head update (one fine-tuning run per value; default 0.01 0.03)")
    p.add_argument("--bergson-python", default=None,
                   help="a Python with bergson installed (default: this one if it imports bergson; else no row)")
    p.add_argument("--bergson-projection", type=int, default=16, help="bergson build --projection_dim")
    p.add_argument("--gemma3-shape", action="store_true",
                   help="only the cost rows, on a random-init model of Gemma-3-270M's shape (V = 262,144, d = 640; "
                        "with --quick a tiny Gemma-3), fed the first domain's samples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = args.quick

    def pick(value, quick_default, default):
        return value if value is not None else quick_default if quick else default

    n_sketch, n_query = pick(args.sketch, 8, 16), pick(args.queries, 4, 30)
    max_length, m = pick(args.max_length, 24, 48), pick(args.m, 256, 4096)
    n_target, steps = pick(args.targets, 2, 8), pick(args.steps, 3, 10)
    index_domains = pick(args.index_domains, 200, 10_000)
    for flag, value, least in (("--sketch", n_sketch, 1), ("--queries", n_query, 1), ("--targets", n_target, 1),
                               ("--steps", steps, 1), ("--max-length", max_length, 2), ("--m", m, 1),
                               ("--batch-size", args.batch_size, 1), ("--max-domains", args.max_domains, 3),
                               ("--index-domains", index_domains, 1),
                               ("--bergson-projection", args.bergson_projection, 1)):
        if value < least:
            p.error(f"{flag}: expected an int ≥ {least}, got {value}")
    if n_target > n_query:
        p.error(f"--targets: expected at most --queries ({n_query}) held-out prompts, got {n_target}")
    if not all(0 < step < float("inf") for step in args.step):
        p.error(f"--step: expected finite lengths > 0, got {args.step}")
    if len(set(args.step)) != len(args.step):
        p.error(f"--step: expected distinct lengths, got {args.step}")
    if args.bergson_python:
        import subprocess

        try:
            failed = subprocess.run([args.bergson_python, "-c", "import bergson"], capture_output=True).returncode
        except OSError:
            failed = True
        if failed:
            p.error(f"--bergson-python: expected a Python that imports bergson, got {args.bergson_python}")
    torch.manual_seed(args.seed)

    if quick:
        domains = stdlib_domains(STDLIB_PACKAGES[:6], lines_per_item=4)
    else:
        if not os.path.isdir(FORTUNES):
            print(f"skipped: the fortunes package is not installed ({FORTUNES}); install it with: {INSTALL}")
            return None
        # the few non-fortune domains first, so --max-domains drops fortune categories
        domains = {**license_domain(), **stdlib_domains(STDLIB_PACKAGES), **fortune_domains(args.min_items)}
    split = dict(list(split_domains(domains, n_sketch, n_query, args.seed).items())[:args.max_domains])
    if len(split) < (1 if args.gemma3_shape else 3):
        p.error(f"--sketch, --queries: only {len(split)} domains have ≥ {n_sketch + n_query} items; "
                f"need {1 if args.gemma3_shape else 3}")
    from fisherfast.sketch import SignatureIndex, SketchSpec, SketchState
    from fisherfast.sketch.model import model_head

    if args.gemma3_shape:
        return gemma3_cost(args, split, max_length, m, quick)
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

    index, means, queries, sources, targets, token_ids = SignatureIndex(spec), [], {}, [], [], {}
    start = time.perf_counter()
    for name, (sketch_texts, query_texts) in tqdm(split.items(), desc="domains"):
        source_ids, query_ids = encode(tokenizer, sketch_texts, max_length), encode(tokenizer, query_texts, max_length)
        source_rows = list(item_rows(model, source_ids, args.batch_size))
        state, mean_a = sketch_rows(head, spec, source_rows, per_item=False)
        index.add(name, state)
        means.append(mean_a)
        queries[name] = sketch_rows(head, spec, item_rows(model, query_ids, args.batch_size), per_item=True)
        target_rows = list(item_rows(model, query_ids[:n_target], args.batch_size))
        sources.append(tuple(torch.cat(z) for z in zip(*source_rows)))
        targets.append(tuple(torch.cat(z) for z in zip(*target_rows)))
        token_ids[name] = (source_ids, query_ids[:n_target])
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
               index_latency(spec, index_domains, k=10)]

    # Source selection: domain t's first --targets held-out prompts are a target task; every other
    # domain's sketching samples a candidate source. S[key][s, t] scores source s for target t.
    domain_means = torch.stack(means)
    per_target = [similarities(index, domain_means, functools.reduce(SketchState.merge, queries[n][0][:n_target]),
                               targets[t][0].double().mean(0)) for t, n in enumerate(names)]
    S = {key: torch.stack([scores_t[key] for scores_t in per_target], 1) for key in per_target[0]}
    bergson_python = args.bergson_python or (sys.executable if importlib.util.find_spec("bergson") else None)
    bergson_info = None
    if bergson_python and not quick:
        from fisherfast.models import DEFAULT_MODEL, cache_dir

        with tempfile.TemporaryDirectory() as workdir:
            S["bergson"], bergson_info = bergson_cosines(bergson_python, str(cache_dir() / f"{DEFAULT_MODEL}-fp32"),
                                                         token_ids, args.bergson_projection, workdir)
        labels["bergson"] = f"bergson mean-gradient cosine (projection {args.bergson_projection})"
        cost.append({"path": f"bergson build, projection {args.bergson_projection} (subprocess, incl. model load)",
                     "tokens": bergson_info["tokens"], "median_s": bergson_info["seconds"],
                     "tokens_per_s": bergson_info["tokens"] / bergson_info["seconds"]})
    else:
        print("bergson: no row (" + ("--quick" if quick else "not installed; pass --bergson-python") + ")")
    selection_rows, transfers = [], {}
    for step in args.step:
        T = transfer_matrix(head, sources, targets, steps, step)
        transfers[f"{step:g}"] = T.tolist()
        selection_rows.append({"step": step, "similarity": "chance", "top1": 1 / (D - 1), "spearman": 0.0})
        selection_rows += [{"step": step, "similarity": labels[key], **value}
                           for key, value in selection_summary(T, S).items()]
    table = "\n\n".join([
        markdown_table(retrieval_rows, ["similarity", "top1", "top5"]),
        markdown_table(cost, ["path", "tokens", "median_s", "tokens_per_s", "peak_extra_MB", "vs_forward"]),
        markdown_table(latency, ["domains", "m", "k", "index_MB", "query_ms", "scores_ms"]),
        markdown_table(selection_rows, ["step", "similarity", "spearman", "spearman_stderr", "spearman_targets",
                                         "top1", "regret"])])
    print(table)
    print(f"(sketching {D} domains and {sum(len(q[0]) for q in queries.values())} prompts took {sketch_s:.1f} s)")
    meta = {"model": model_name, "domains": names, "n_sketch": n_sketch, "n_query": n_query,
            "max_length": max_length, "spec": spec.to_json(), "threads": torch.get_num_threads(), "quick": quick,
            "sketch_seconds": sketch_s, "targets": n_target, "steps": steps, "bergson": bergson_info,
            "transfer": transfers, "scores": {key: value.tolist() for key, value in S.items()}}
    name = os.path.splitext(os.path.basename(default_results_path("bench_domains", quick)))[0]
    path = write_results(name, [*retrieval_rows, *cost, *latency, *selection_rows], meta, table)
    print(f"wrote {path}")
    return {"retrieval": retrieval_rows, "cost": cost, "latency": latency, "selection": selection_rows,
            "domains": names}


if __name__ == "__main__":
    main()
