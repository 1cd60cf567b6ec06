"""Source selection: does head-Fisher alignment predict transfer? (embedded SmolLM2-135M-Instruct)

Target: review sentiment with the yes_no verbalizer on n held-out reviews.
Candidates: ten source tasks sharing the tokenizer, written here and in
fisherfast.sketch.tasks: the same task on other reviews, other verbalizers
(no_yes, good_bad, a_b), another question template, another label (food topic,
shuffled labels) and other domains (true/false statements with Yes/No or
True/False answers, capital cities). For each candidate:

  transfer   fine-tune only the head W (the model's unembedding, untied) on the
             source for a fixed budget (``--steps`` normalized gradient steps of
             Frobenius length ``--step``, from the model's own W; one run per
             length, the source's own loss drop shows which are descent) and report
             L_target(W₀) − L_target(W): the drop of the target's mean
             cross-entropy (its answers, full vocabulary). Positive = helps.
  A          FisherSketch head-Fisher alignment with the target (m = 4096), ± stderr
  A exact    the same from the kernel identity (docs/design.md §7), materialized
  S_a, S_e   the sketch's activation / error marginals; ρ = A / (S_a S_e)
  CKA        activation-only similarity: linear CKA of the head inputs in its
             unpaired form, the cosine of the centered second moments
             ⟨C_t, C_s⟩_F / (‖C_t‖_F ‖C_s‖_F), C = X_cᵀX_c (X_c centered rows)
  grad cos   reference: cosine of the two tasks' mean head gradients Σ e⊗a (what
             one gradient step's first-order effect depends on)
  G          the same from the sketch's first moment (same pass as A), ± stderr

Reported: Spearman correlations of transfer with each score over the candidates.

    python bench/bench_source_selection.py [--n 24] [--m 4096] [--steps 20] [--step 0.003 0.01 0.03]
    python bench/bench_source_selection.py --quick   # tiny random model + word-level tokenizer
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import markdown_table, write_results  # noqa: E402
from head_transfer import finetune_head, mean_cross_entropy  # noqa: E402

from fisherfast.sketch import SketchSpec, rank_sources  # noqa: E402
from fisherfast.sketch.model import sketch_tasks  # noqa: E402
from fisherfast.sketch.tasks import REVIEWS, PromptTask, verbalizer_tasks  # noqa: E402
from fisherfast.split import final_head_inputs, output_head  # noqa: E402

FACTS = (  # (statement, true)
    ("Water boils at 100 degrees Celsius at sea level.", True), ("The sun rises in the west.", False),
    ("A week has seven days.", True), ("Fish breathe air through lungs.", False),
    ("Paris is in France.", True), ("Ice is hotter than steam.", False),
    ("Bees make honey.", True), ("The moon is made of cheese.", False),
    ("Humans have two hands.", True), ("Snow is usually black.", False),
    ("Cats are mammals.", True), ("A triangle has five sides.", False),
    ("The Pacific is an ocean.", True), ("Spiders have six legs.", False),
    ("Gold is a metal.", True), ("Trees grow from their leaves downward.", False),
    ("Rain is made of water.", True), ("A year has twenty months.", False),
    ("Dogs can bark.", True), ("The earth is flat.", False),
    ("Milk comes from cows.", True), ("Birds have fur instead of feathers.", False),
    ("Two plus two is four.", True), ("Sugar tastes sour.", False),
)
CAPITALS = (  # (city, country, is its capital)
    ("Paris", "France", True), ("Sydney", "Australia", False), ("Rome", "Italy", True), ("Milan", "Italy", False),
    ("Tokyo", "Japan", True), ("Osaka", "Japan", False), ("Berlin", "Germany", True), ("Munich", "Germany", False),
    ("Madrid", "Spain", True), ("Barcelona", "Spain", False), ("Ottawa", "Canada", True),
    ("Toronto", "Canada", False), ("Cairo", "Egypt", True), ("Lagos", "Nigeria", False),
    ("Lima", "Peru", True), ("Chicago", "America", False), ("Oslo", "Norway", True), ("Bergen", "Norway", False),
    ("Dublin", "Ireland", True), ("Cork", "Ireland", False), ("Athens", "Greece", True),
    ("Geneva", "Switzerland", False), ("Vienna", "Austria", True), ("Porto", "Portugal", False),
)
FOOD = {8, 9, 22, 23, 38, 39}  # reviews about food or restaurants


def build_tasks(n: int) -> tuple[PromptTask, list[PromptTask]]:
    """(target, candidates); n prompts each (n ≤ 24)."""
    if not 2 <= n <= 24:
        raise ValueError(f"n must be in [2, 24], got {n}")
    target = verbalizer_tasks(["yes_no"], n=n, offset=24, suffix="_target")[0]
    candidates = verbalizer_tasks(["yes_no", "no_yes", "good_bad", "a_b"], n=n, offset=0)
    reviews = REVIEWS[:n]
    yn = lambda flags: tuple(" Yes" if f else " No" for f in flags)  # noqa: E731
    candidates.append(PromptTask("liked_template", tuple(f"Review: {r}\nDid the writer like it? Answer:"
                                                         for r, _ in reviews), yn(p for _, p in reviews)))
    candidates.append(PromptTask("food_topic", candidates[0].prompts, yn(i in FOOD for i in range(n))))
    shuffled = [p for _, p in reviews]
    random.Random(0).shuffle(shuffled)
    candidates.append(PromptTask("random_labels", candidates[0].prompts, yn(shuffled)))
    facts = FACTS[:n]
    fact_prompts = tuple(f"Statement: {s}\nIs this statement true? Answer:" for s, _ in facts)
    candidates.append(PromptTask("facts_yes_no", fact_prompts, yn(t for _, t in facts)))
    candidates.append(PromptTask("facts_true_false", fact_prompts,
                                 tuple(" True" if t else " False" for _, t in facts)))
    caps = CAPITALS[:n]
    candidates.append(PromptTask("capitals", tuple(f"Q: Is {c} the capital of {k}?\nA:" for c, k, _ in caps),
                                 yn(t for _, _, t in caps)))
    return target, candidates


def head_data(model, tokenizer, task: PromptTask) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (n, d), y (n,)): float64 head inputs at each prompt's last token (one prompt at a time), labels."""
    rows = [final_head_inputs(model, tokenizer(p, return_tensors="pt")["input_ids"])[0, -1] for p in task.prompts]
    return torch.stack(rows).double(), torch.tensor(task.label_ids(tokenizer))


def errors(W, b, a, y) -> torch.Tensor:
    e = torch.softmax(a @ W.T + (0 if b is None else b), -1)
    e[torch.arange(len(y)), y] -= 1
    return e


def cov_cosine(X, Y) -> float:
    """Linear CKA for unpaired samples: cosine of the centered second moments."""
    Cx, Cy = [(Z - Z.mean(0)).T @ (Z - Z.mean(0)) for Z in (X, Y)]
    return float((Cx * Cy).sum() / (Cx.norm() * Cy.norm()))


def kernel_alignment(s, t) -> float:
    """Exact A from ⟨F̂_s, F̂_t⟩ = mean over pairs (a·a′)²(e·e′)² (docs/design.md §7)."""
    k = lambda u, v: float(((u[0] @ v[0].T).square() * (u[1] @ v[1].T).square()).mean())  # noqa: E731
    return k(s, t) / (k(s, s) * k(t, t)) ** 0.5


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


SCORES = ("A", "A exact", "S_a", "S_e", "CKA", "grad cos", "G")


def run(model, tokenizer, *, n: int, m: int, steps: int, step_sizes) -> tuple[list[dict], dict]:
    """Rows per candidate (scores, and per step size the transfer and the source's own loss drop) and the
    Spearman correlations of each step size's transfer with each score."""
    target, candidates = build_tasks(n)
    head = output_head(model)
    W0 = head.W.double().clone()
    b = None if head.b is None else head.b.double()
    spec = SketchSpec(d=W0.shape[1], K=W0.shape[0], m=m)
    states = sketch_tasks(model, tokenizer, [target, *candidates], spec=spec, progress=False)
    scores = {s.name: s for s in rank_sources(states[target.name], {c.name: states[c.name] for c in candidates})}
    a_t, y_t = head_data(model, tokenizer, target)
    base = mean_cross_entropy(W0, b, a_t, y_t)
    e_t = errors(W0, b, a_t, y_t)
    g_t = e_t.T @ a_t
    rows = []
    for task in candidates:
        a_s, y_s = head_data(model, tokenizer, task)
        e_s = errors(W0, b, a_s, y_s)
        g_s = e_s.T @ a_s
        s = scores[task.name]
        row = {"source": task.name, "A": s.A, "A stderr": s.A_stderr,
               "A exact": kernel_alignment((a_s, e_s), (a_t, e_t)), "S_a": s.S_a, "S_e": s.S_e, "rho": s.rho,
               "CKA": cov_cosine(a_s, a_t), "grad cos": float((g_s * g_t).sum() / (g_s.norm() * g_t.norm())),
               "G": s.G, "G stderr": s.G_stderr}
        for size in step_sizes:
            W = finetune_head(W0, b, a_s, y_s, steps, size)
            row[f"transfer@{size:g}"] = base - mean_cross_entropy(W, b, a_t, y_t)
            row[f"source drop@{size:g}"] = mean_cross_entropy(W0, b, a_s, y_s) - mean_cross_entropy(W, b, a_s, y_s)
        rows.append(row)
    rows.sort(key=lambda r: -r[f"transfer@{step_sizes[0]:g}"])
    summary = {"target base loss": base, "n": n, "m": m, "steps": steps, "step_sizes": list(step_sizes),
               "spearman": {f"{size:g}": {k: spearman([r[f"transfer@{size:g}"] for r in rows], [r[k] for r in rows])
                                          for k in SCORES} for size in step_sizes}}
    return rows, summary


def quick_model_and_tokenizer():
    """A one-block random Llama over a word-level vocabulary of every word in the tasks."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    target, candidates = build_tasks(8)
    pre = pre_tokenizers.Whitespace()
    words = {w for task in (target, *candidates) for text in (*task.prompts, *task.answers)
             for w, _ in pre.pre_tokenize_str(text)}
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = "eager"
    model = tf.LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    return model, tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 8 prompts per task, m = 256")
    parser.add_argument("--n", type=int, default=24, help="prompts per task (≤ 24)")
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step", type=float, nargs="+", default=[0.003, 0.01, 0.03],
                        help="Frobenius length of each head update (one fine-tuning run per value)")
    args = parser.parse_args(argv)
    if args.quick:
        model, tokenizer = quick_model_and_tokenizer()
        args.n, args.m = 8, 256
    else:
        from fisherfast.models import load_default

        model, tokenizer = load_default()
    rows, summary = run(model, tokenizer, n=args.n, m=args.m, steps=args.steps, step_sizes=args.step)
    sizes = [f"{size:g}" for size in args.step]
    table = markdown_table(rows, ["source", *(f"transfer@{z}" for z in sizes), *(f"source drop@{z}" for z in sizes),
                                  "A", "A stderr", "A exact", "S_a", "S_e", "rho", "CKA", "grad cos", "G",
                                  "G stderr"])
    table += "\n\nSpearman correlation of transfer with each score, per step size:\n\n" + markdown_table(
        [{"step": z, **summary["spearman"][z]} for z in sizes], ["step", *SCORES])
    print(table)
    print({k: v for k, v in summary.items() if k != "spearman"})
    path = write_results("bench_source_selection" + ("_quick" if args.quick else ""), rows,
                         {**summary, "quick": args.quick}, table)
    print(f"wrote {path}")
    return rows, summary


if __name__ == "__main__":
    main()
