"""`fisherfast steer`: FishBack vs Euclidean steering of a target's probability
(docs/design.md §5), then a generation with the vector hooked in.

A target of several tokens is, by default, a sequence: p(y₁…y_n | prompt), the
probability that the model continues the prompt with exactly those tokens
(``SequenceConcept``). ``--as alternatives`` reads its tokens instead as
alternative next tokens: p(y₁) + … + p(y_n) (``ConceptScore``). For one token
the two are the same.

``--save`` writes the first method's vector as a ``SteeringVectors`` file
(with the model's identity), ``--lm-eval`` as lm-evaluation-harness's
``steered`` .pt file (``lm_eval --model steered --model_args
pretrained=...,steer_path=FILE``; added at every position); both are
checked before the model loads."""
from __future__ import annotations

import math
import time

from fisherfast.cli._args import UsageError, add_command, nonempty_str, nonnegative_int, open_unit_float
from fisherfast.cli._files import OutputKind, check_output, safetensors_of_format, write_output
from fisherfast.cli._model import MODEL_HELP, load_model, model_shape
from fisherfast.cli._progress import steps, working

METHODS = ("fishback", "euclidean")
READINGS = ("sequence", "alternatives")


def _is_lm_eval_file(path: str) -> bool:
    import torch

    try:
        config = torch.load(path, weights_only=True)
    except Exception:  # any unreadable or foreign file is "not an lm-eval steering file"
        return False
    return isinstance(config, dict) and all(isinstance(v, dict) and "steering_vector" in v for v in config.values())


VECTORS = OutputKind("steering vectors", (".safetensors",), safetensors_of_format("fisherfast.steer.vectors"))
LM_EVAL = OutputKind("lm-eval steering", (".pt", ".pth"), _is_lm_eval_file)


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
    p.add_argument("--save", metavar="FILE", help="write the first method's vector as a steering vectors file "
                                                  "(.safetensors, with the model's identity)")
    p.add_argument("--lm-eval", dest="lm_eval", metavar="FILE",
                   help="write the first method's vector as lm-evaluation-harness's steered .pt file (added at "
                        "every position: lm_eval --model steered --model_args pretrained=...,steer_path=FILE)")
    p.add_argument("--force", action="store_true", help="replace existing --save / --lm-eval files")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=run)


def steer_report(model, tokenizer, prompt: str, word: str, layer: int, goal: float, methods, new_tokens: int,
                 progress: bool = True, reading: str = "sequence"):
    """Steer the probability of ``word`` after ``prompt`` to ``goal`` at ``layer``
    with each method (``reading``: "sequence" or "alternatives", see the module
    docstring); print the table and a generation with the first method's vector
    hooked into the model. Returns the first method's ``MethodResult``."""
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
    return first


def run(args) -> int:
    model_shape(args.model).check_layers([args.layer])
    if args.lm_eval is not None and args.layer == 0:
        raise UsageError("--lm-eval: layer 0 (the embeddings) has no lm-eval hookpoint; use --layer ≥ 1")
    save = check_output(args.save, VECTORS, force=args.force, option="--save") if args.save else None
    lm_eval = check_output(args.lm_eval, LM_EVAL, force=args.force, option="--lm-eval") if args.lm_eval else None
    if save is not None and save == lm_eval:
        raise UsageError("--save and --lm-eval name the same file")
    methods = list(dict.fromkeys(args.method))  # each method once, in the order given
    model, tokenizer = load_model(args.model, not args.no_progress)
    first = steer_report(model, tokenizer, args.prompt, args.target, args.layer, args.prob, methods, args.new_tokens,
                         not args.no_progress, args.reading)
    if save is None and lm_eval is None:
        return 0
    from fisherfast.steer import SteeringVectors

    vectors = SteeringVectors.for_model(model, {args.layer: first.delta}, method=first.method, settings={
        "prompt": args.prompt, "target": args.target, "reading": args.reading, "p": args.prob, "layer": args.layer})
    ok = True
    if save is not None and write_output(save, vectors.save, "steering vectors"):
        print(f"wrote {save}")
    elif save is not None:
        ok = False
    if lm_eval is not None and write_output(lm_eval, lambda tmp: vectors.to_lm_eval(tmp, model),
                                            "lm-eval steering file"):
        print(f"wrote {lm_eval} (lm_eval --model steered --model_args pretrained=<model>,steer_path={lm_eval})")
    elif lm_eval is not None:
        ok = False
    return 0 if ok else 1
