"""`fisherfast steer`: FishBack vs Euclidean steering of one next-token
probability (docs/design.md §5), then a generation with the vector hooked in."""
from __future__ import annotations

import math
import time

from fisherfast.cli._args import UsageError, add_command, nonempty_str, nonnegative_int, open_unit_float
from fisherfast.cli._model import MODEL_HELP, load_model, model_shape
from fisherfast.cli._progress import steps, working

METHODS = ("fishback", "euclidean")


def register(sub) -> None:
    p = add_command(sub, "steer", "FishBack vs Euclidean steering of one next-token probability")
    p.add_argument("--prompt", type=nonempty_str, required=True, help="the context; its last token's state is steered")
    p.add_argument("--target", type=nonempty_str, required=True,
                   help="the word whose tokens form the concept, e.g. ' London' (mind the leading space); a word "
                        "of several tokens scores the set of its tokens as alternative next tokens")
    p.add_argument("--prob", type=open_unit_float, default=0.5, help="target probability of the concept tokens")
    p.add_argument("--layer", type=int, required=True, help="layer ℓ ∈ [0, L]: h is the input of block ℓ")
    p.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to compare; the first one's vector drives the generation")
    p.add_argument("--new-tokens", type=nonnegative_int, default=12, help="tokens to generate with the vector hooked in")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=run)


def _field(row, name: str):
    """A field of a compare_methods row, whether a dict or a result object."""
    return row[name] if isinstance(row, dict) else getattr(row, name)


def steer_report(model, tokenizer, prompt: str, word: str, layer: int, goal: float, methods, new_tokens: int,
                 progress: bool = True) -> None:
    """Steer p(word | prompt) to ``goal`` at ``layer`` with each method; print the
    table and a generation with the first method's vector hooked into the model."""
    from fisherfast.split import SplitModel
    from fisherfast.steer import ConceptScore, compare_methods, steering

    target_ids = tokenizer.encode(word, add_special_tokens=False)
    if not target_ids:
        raise UsageError(f"--target {word!r} has no tokens")
    pieces = [tokenizer.decode([i]) for i in target_ids]
    if len(set(target_ids)) != len(target_ids):
        raise UsageError(f"--target {word!r} is the tokens {pieces}, one of them repeated; steer scores the set of "
                         f"the target's tokens as alternative next tokens, so each may appear once (a word whose "
                         f"tokens all differ, or one token)")
    label = f"p({word!r})" if len(target_ids) == 1 else \
        f"p(next token ∈ {{{', '.join(map(repr, pieces))}}}) (the tokens of {word!r} as alternatives, not the sequence)"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    split = SplitModel(model, layer)
    ctx = split.context(ids[0])
    concept = ConceptScore(target_ids)
    p0 = float(concept.target_probability(split.logits(ctx, ctx.h)))
    start = time.perf_counter()
    rows = []
    for method in steps(methods, "steering", progress):
        rows += compare_methods(split, ctx, concept, math.log(goal), methods=(method,))
    print(f"raise {label} after {prompt!r} from {p0:.3f} to {goal} at layer {layer} "
          f"({time.perf_counter() - start:.1f} s):")
    print("| method | reached | steps | p | KL(p₀‖p) | off-target KL | ‖δ‖ |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {_field(r, 'method')} | {_field(r, 'reached')} | {_field(r, 'steps')} | "
              f"{_field(r, 'target_prob'):.3f} | {_field(r, 'kl'):.3f} | {_field(r, 'off_target_kl'):.3f} | "
              f"{_field(r, 'delta_norm'):.1f} |")
    first = rows[0]
    if new_tokens:
        with working("generating", progress), steering(model, {layer: _field(first, "delta")}):
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:])
        print(f"generation with the {_field(first, 'method')} vector hooked in at layer {layer}: "
              f"{prompt!r} → {text!r}")


def run(args) -> int:
    model_shape(args.model).check_layers([args.layer])
    methods = list(dict.fromkeys(args.method))  # each method once, in the order given
    model, tokenizer = load_model(args.model, not args.no_progress)
    steer_report(model, tokenizer, args.prompt, args.target, args.layer, args.prob, methods, args.new_tokens,
                 not args.no_progress)
    return 0
