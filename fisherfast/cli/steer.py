"""`fisherfast steer`: FishBack vs Euclidean steering of a target's probability
(docs/design.md §5), then a generation with the vector hooked in.

A target of several tokens is, by default, a sequence: p(y₁…y_n | prompt), the
probability that the model continues the prompt with exactly those tokens
(``SequenceConcept``). ``--as alternatives`` reads its tokens instead as
alternative next tokens: p(y₁) + … + p(y_n) (``ConceptScore``). For one token
the two are the same."""
from __future__ import annotations

import math
import time

from fisherfast.cli._args import UsageError, add_command, nonempty_str, nonnegative_int, open_unit_float
from fisherfast.cli._model import MODEL_HELP, load_model, model_shape
from fisherfast.cli._progress import steps, working

METHODS = ("fishback", "euclidean")
READINGS = ("sequence", "alternatives")


def register(sub) -> None:
    p = add_command(sub, "steer", "FishBack vs Euclidean steering of a target's probability")
    p.add_argument("--prompt", type=nonempty_str, required=True, help="the context; its last token's state is steered")
    p.add_argument("--target", type=nonempty_str, required=True,
                   help="the text whose tokens form the concept, e.g. ' London' or ' New York' (mind the leading space)")
    p.add_argument("--as", dest="reading", choices=READINGS, default="sequence",
                   help="a multi-token target as a sequence, p(y₁…y_n | prompt), or as alternative next tokens, "
                        "p(y₁) + … + p(y_n)")
    p.add_argument("--prob", type=open_unit_float, default=0.5, help="target probability of the concept")
    p.add_argument("--layer", type=int, required=True, help="layer ℓ ∈ [0, L]: h is the input of block ℓ")
    p.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to compare; the first one's vector drives the generation")
    p.add_argument("--new-tokens", type=nonnegative_int, default=12, help="tokens to generate with the vector hooked in")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=run)


def steer_report(model, tokenizer, prompt: str, word: str, layer: int, goal: float, methods, new_tokens: int,
                 progress: bool = True, reading: str = "sequence") -> None:
    """Steer the probability of ``word`` after ``prompt`` to ``goal`` at ``layer``
    with each method (``reading``: "sequence" or "alternatives", see the module
    docstring); print the table and a generation with the first method's vector
    hooked into the model."""
    from fisherfast.split import SplitModel
    from fisherfast.steer import ConceptScore, SequenceConcept, compare_methods, steering

    target_ids = tokenizer.encode(word, add_special_tokens=False)
    if not target_ids:
        raise UsageError(f"--target {word!r} has no tokens")
    if reading == "alternatives" and len(set(target_ids)) != len(target_ids):
        raise UsageError(f"--target {word!r} repeats a token; as alternatives each token counts once: "
                         "use --as sequence")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    split = SplitModel(model, layer)
    pieces = " + ".join(repr(tokenizer.decode([i])) for i in target_ids)
    if reading == "sequence" and len(target_ids) > 1:
        ctx = split.context(ids[0], continuation=target_ids)
        concept = SequenceConcept(target_ids)
        label = f"p({word!r} | prompt), the sequence {pieces}"
    else:
        ctx = split.context(ids[0])
        concept = ConceptScore(target_ids)
        label = f"p({word!r})" if len(target_ids) == 1 else f"p({pieces}) as alternative next tokens"
    p0 = float(concept.probability(split, ctx, ctx.h))
    start = time.perf_counter()
    rows = []
    for method in steps(methods, "steering", progress):
        rows += compare_methods(split, ctx, concept, math.log(goal), methods=(method,))
    print(f"raise {label} after {prompt!r} from {p0:.3f} to {goal} at layer {layer} "
          f"({time.perf_counter() - start:.1f} s):")
    print("| method | reached | steps | p | KL(p₀‖p) | off-target KL(p₀‖p) | ‖δ‖ |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.method} | {r.reached} | {r.steps} | {r.target_prob:.3f} | {r.kl:.3f} | {r.off_target_kl:.3f} | "
              f"{r.delta_norm:.1f} |")
    first = rows[0]
    if new_tokens:
        with working("generating", progress), steering(model, {layer: first.delta}):
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:])
        print(f"generation with the {first.method} vector hooked in at layer {layer}: {prompt!r} → {text!r}")


def run(args) -> int:
    model_shape(args.model).check_layers([args.layer])
    methods = list(dict.fromkeys(args.method))  # each method once, in the order given
    model, tokenizer = load_model(args.model, not args.no_progress)
    steer_report(model, tokenizer, args.prompt, args.target, args.layer, args.prob, methods, args.new_tokens,
                 not args.no_progress, args.reading)
    return 0
