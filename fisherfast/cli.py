"""The `fisherfast` command.

    fisherfast info                 versions, backends, CPU features
    fisherfast demo                 the main job on the embedded default model
                                    (model, FisherSketch, metric, steering)
    fisherfast spectrum --layer L   pullback-metric diagnostics + spectrum PNG
    fisherfast sketch ...           FisherSketch signature of a text file
    fisherfast align SIG...         alignment table + heatmap of signatures
    fisherfast steer --prompt P --target W --layer L
                                    FishBack vs Euclidean steering of p(W | P)
"""
from __future__ import annotations

import argparse
import platform
import sys
import time


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags) or "none of " + ",".join(wanted)


def cmd_info(args) -> int:
    import torch

    import fisherfast

    print(f"fisherfast {fisherfast.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    for name in ("triton", "transformers", "scipy", "numpy"):
        try:
            module = __import__(name)
            print(f"{name} {module.__version__}")
        except ImportError:
            print(f"{name} not installed")
    print(f"cpu {platform.machine()}  features: {_cpu_features()}")
    print("backends:")
    for status in fisherfast.available_backends().values():
        print(f"  {status}")
    return 0


def _demo_model(model, tokenizer, args) -> None:
    prompt = "The capital of France is"
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    top = logits.softmax(-1).topk(5)
    print(f"model: {model.config.model_type}, d={model.config.hidden_size}, V={model.config.vocab_size}, "
          f"layers={model.config.num_hidden_layers}")
    words = ", ".join(f"{tokenizer.decode(int(i))!r} {float(p):.3f}" for p, i in zip(top.values, top.indices))
    print(f"next token after {prompt!r}: {words}")


def _alignment_table(result, label: str = "A") -> str:
    """Plain-text matrix of cosines, with ± standard errors when known."""
    names = result.names
    width = max(12, *(len(n) for n in names)) + 2
    lines = [f"{label:<{width}}" + "".join(f"{n:>{width}}" for n in names)]
    for i, name in enumerate(names):
        cells = []
        for j in range(len(names)):
            cell = f"{float(result.A[i, j]):.3f}"
            if result.stderr is not None and i != j:
                cell += f"±{float(result.stderr[i, j]):.3f}"
            cells.append(f"{cell:>{width}}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _heatmap(result, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
    image = ax.imshow(result.A.numpy(), vmin=min(0.0, float(result.A.min())), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), result.names, rotation=45, ha="right")
    ax.set_yticks(range(n), result.names)
    for i in range(n):
        for j in range(n):
            value = float(result.A[i, j])
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _demo_sketch(model, tokenizer, args) -> None:
    import os

    from fisherfast.sketch import SketchSpec, alignment
    from fisherfast.sketch.model import sketch_tasks
    from fisherfast.sketch.tasks import verbalizer_tasks

    tasks = verbalizer_tasks(n=8)
    spec = SketchSpec(d=model.config.hidden_size, K=model.get_output_embeddings().out_features, m=4096)
    start = time.perf_counter()
    states = sketch_tasks(model, tokenizer, tasks, spec=spec, progress=False)
    print(f"{len(tasks)} verbalizers of the same {len(tasks[0].prompts)} review prompts "
          f"(e.g. {tasks[0].prompts[0]!r}), m={spec.m}, sketched in {time.perf_counter() - start:.1f} s")
    joint = alignment(states)
    print("head-Fisher alignment (FisherSketch): different answer tokens give near-orthogonal Fishers; "
          "swapping Yes/No on balanced labels does not move the second moment much")
    print(_alignment_table(joint))
    print("activation marginal S_a (same prompts, so activation-only similarity cannot tell them apart):")
    print(_alignment_table(alignment(states, kind="activation"), "S_a"))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fishersketch_verbalizers.png")
    _heatmap(joint, path, "FisherSketch head-Fisher alignment")
    print(f"heatmap: {path}")


def _spectrum_surveys(model, tokenizer, layers, prompts, mode: str, progress: bool, **options):
    from fisherfast.metric import spectrum_survey
    from fisherfast.split import SplitModel

    surveys = []
    for layer in layers:
        try:
            split = SplitModel(model, layer)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"bad --layer {layer}: {err}")
        contexts = split.contexts([tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts])
        surveys.append(spectrum_survey(split, contexts, mode=mode, progress=progress, **options))
    return surveys


def _demo_metric(model, tokenizer, args) -> None:
    import os

    from fisherfast.metric import plot_spectra, survey_table
    from fisherfast.prompts import NATURAL_PROMPTS

    prompts, layer = NATURAL_PROMPTS[:3], 24
    start = time.perf_counter()
    surveys = _spectrum_surveys(model, tokenizer, [layer], prompts, "exact", progress=False)
    print(f"exact pullback Fisher metric at layer {layer}, last token of {len(prompts)} prompts "
          f"(e.g. {prompts[0]!r}), in {time.perf_counter() - start:.1f} s:")
    print(survey_table(surveys))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "metric_spectrum.png")
    plot_spectra(surveys, path)
    print(f"spectrum: {path}  (FishBack on GPT-2: > 97% relative spectral deviation, PR/d 2–17%)")


def _steer_report(model, tokenizer, prompt: str, word: str, layer: int, goal: float, methods, new_tokens: int) -> None:
    """Steer p(word) after prompt to goal at layer with each method; print the table and
    a generation with the first method's vector hooked into the model."""
    import math

    from fisherfast.split import SplitModel
    from fisherfast.steer import ConceptScore, compare_methods, steering

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    split = SplitModel(model, layer)
    ctx = split.context(ids[0])
    concept = ConceptScore(tokenizer.encode(word))
    p0 = float(concept.target_probability(split.logits(ctx, ctx.h)))
    start = time.perf_counter()
    rows = compare_methods(split, ctx, concept, math.log(goal), methods=tuple(methods))
    print(f"raise p({word!r}) after {prompt!r} from {p0:.3f} to {goal} at layer {layer} "
          f"({time.perf_counter() - start:.1f} s):")
    print("| method | reached | steps | p | KL(p₀‖p) | off-target KL | ‖δ‖ |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.method} | {r.reached} | {r.steps} | {r.target_prob:.3f} | {r.kl:.3f} | "
              f"{r.off_target_kl:.3f} | {r.delta_norm:.1f} |")
    with steering(model, {layer: rows[0].delta}):
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    print(f"generation with the {rows[0].method} vector hooked in at layer {layer}: {prompt!r} → {text!r}")


def _demo_steering(model, tokenizer, args) -> None:
    _steer_report(model, tokenizer, "The capital of France is", " London", 24, 0.5, ("fishback", "euclidean"), 6)


def cmd_steer(args) -> int:
    if not 0 < args.prob < 1:
        raise SystemExit(f"--prob must be in (0, 1), got {args.prob}")
    if args.new_tokens < 0:
        raise SystemExit(f"--new-tokens must be ≥ 0, got {args.new_tokens}")
    model, tokenizer = _load_model(args.model)
    _steer_report(model, tokenizer, args.prompt, args.target, args.layer, args.prob, args.method, args.new_tokens)
    return 0


DEMO_SECTIONS = [("model", _demo_model), ("FisherSketch", _demo_sketch), ("metric", _demo_metric),
                 ("steering", _demo_steering)]


def cmd_demo(args) -> int:
    from fisherfast.models import load_default

    start = time.perf_counter()
    model, tokenizer = load_default()
    print(f"loaded the embedded default model in {time.perf_counter() - start:.1f} s")
    for title, section in DEMO_SECTIONS:
        print(f"\n== {title} ==")
        section(model, tokenizer, args)
    return 0


def _load_model(name: str):
    if name == "default":
        from fisherfast.models import load_default

        return load_default()
    import os

    if not os.path.isdir(name):
        raise SystemExit(f"--model must be 'default' or a local Hugging Face model directory, got {name!r}")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype="float32")
    return model.eval().requires_grad_(False), tokenizer


def cmd_spectrum(args) -> int:
    from fisherfast.metric import plot_spectra, survey_table
    from fisherfast.prompts import load_prompts

    try:
        prompts = load_prompts(args.prompts)
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read --prompts: {err}")
    if args.max_prompts is not None:
        prompts = prompts[:max(args.max_prompts, 1)]
    model, tokenizer = _load_model(args.model)
    options = {"tail_tol": args.tail_tol} if args.mode == "topk" else {}
    start = time.perf_counter()
    surveys = _spectrum_surveys(model, tokenizer, args.layer, prompts, args.mode, not args.no_progress, **options)
    print(f"{args.mode} pullback Fisher metric, last token of {len(prompts)} prompts, "
          f"{time.perf_counter() - start:.1f} s:")
    print(survey_table(surveys))
    plot_spectra(surveys, args.out)
    print(f"spectrum: {args.out}")
    return 0


def cmd_sketch(args) -> int:
    from fisherfast.sketch import SketchSpec
    from fisherfast.sketch.model import sketch_model

    try:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    except OSError as err:
        raise SystemExit(f"cannot read --texts: {err}")
    if not texts:
        raise SystemExit(f"--texts {args.texts} holds no non-empty line")
    model, tokenizer = _load_model(args.model)
    head = model.get_output_embeddings()
    try:
        spec = SketchSpec(d=head.in_features, K=head.out_features, m=args.m, seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"bad --m/--seed: {err}")
    start = time.perf_counter()
    state = sketch_model(model, tokenizer, texts, spec=spec, batch_size=args.batch_size, sample=args.sample,
                         max_length=args.max_length, progress=not args.no_progress)
    state.save(args.out)
    print(f"{len(texts)} texts, {state.count} positions sketched in {time.perf_counter() - start:.1f} s under {spec}")
    print(f"wrote {args.out} (state {state.nbytes} bytes; signature {state.signature().nbytes} bytes)")
    return 0


def cmd_align(args) -> int:
    import os

    from fisherfast.sketch import SketchState, alignment, marginals

    states = {}
    for path in args.signatures:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in states:
            name = path
        try:
            states[name] = SketchState.load(path)
        except (OSError, ValueError) as err:
            raise SystemExit(f"cannot load {path}: {err}")
    try:
        result = alignment(states, kind=args.kind, debiased=args.debiased)
    except ValueError as err:
        raise SystemExit(str(err))
    print(f"{args.kind} alignment{' (debiased)' if args.debiased else ''} of {len(states)} signatures, "
          f"counts {', '.join(str(s.count) for s in states.values())}:")
    print(_alignment_table(result))
    if args.kind == "joint" and len(states) > 1:
        S_a, S_e, rho = marginals(states)
        for label, M in (("S_a", S_a), ("S_e", S_e), ("rho", rho)):
            print(_alignment_table(type(result)(M, None, result.names), label))
    if args.out:
        _heatmap(result, args.out, f"FisherSketch {args.kind} alignment")
        print(f"heatmap: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and CPU features").set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="the main job on the embedded default model")
    demo.add_argument("--out", default="fisherfast-demo", help="folder for figures and signatures")
    demo.set_defaults(func=cmd_demo)
    sketch = sub.add_parser("sketch", help="FisherSketch state of a text file (one text per line)")
    sketch.add_argument("--model", default="default", help="'default' (embedded SmolLM2) or a local model folder")
    sketch.add_argument("--texts", required=True, help="text file, one text per non-empty line")
    sketch.add_argument("--out", required=True, help="output .safetensors (state + spec)")
    sketch.add_argument("--m", type=int, default=4096, help="number of features (signature size)")
    sketch.add_argument("--seed", type=int, default=0, help="spec seed; align only signatures with equal seeds")
    sketch.add_argument("--batch-size", type=int, default=8)
    sketch.add_argument("--max-length", type=int, default=512, help="truncate texts to this many tokens")
    sketch.add_argument("--sample", action="store_true", help="y ~ p (true Fisher) instead of the next token")
    sketch.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sketch.set_defaults(func=cmd_sketch)
    spectrum = sub.add_parser("spectrum", help="pullback-metric diagnostics + eigenvalue spectrum PNG")
    spectrum.add_argument("--layer", type=int, nargs="+", required=True, metavar="L",
                          help="layer(s) ℓ: h is the input of block ℓ")
    spectrum.add_argument("--prompts", help="text file, one prompt per non-empty line (default: built-in prompts)")
    spectrum.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    spectrum.add_argument("--model", default="default", help="'default' (embedded SmolLM2) or a local model folder")
    spectrum.add_argument("--mode", choices=("exact", "topk"), default="exact")
    spectrum.add_argument("--tail-tol", type=float, default=1e-3, help="top-k tail mass tolerance τ (--mode topk)")
    spectrum.add_argument("--out", default="fisherfast-spectrum.png", help="spectrum PNG path")
    spectrum.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    spectrum.set_defaults(func=cmd_spectrum)
    steer = sub.add_parser("steer", help="FishBack vs Euclidean steering of one next-token probability")
    steer.add_argument("--prompt", required=True, help="the context; its last token's state is steered")
    steer.add_argument("--target", required=True, help="the word whose tokens form the concept, e.g. ' London'")
    steer.add_argument("--prob", type=float, default=0.5, help="target probability of the concept tokens")
    steer.add_argument("--layer", type=int, required=True, help="layer ℓ: h is the input of block ℓ")
    steer.add_argument("--method", nargs="+", choices=("fishback", "euclidean"), default=["fishback", "euclidean"],
                       help="methods to compare; the first one's vector drives the generation")
    steer.add_argument("--new-tokens", type=int, default=12, help="tokens to generate with the vector hooked in")
    steer.add_argument("--model", default="default", help="'default' (embedded SmolLM2) or a local model folder")
    steer.set_defaults(func=cmd_steer)
    align = sub.add_parser("align", help="alignment table (+ heatmap) of FisherSketch signatures")
    align.add_argument("signatures", nargs="+", metavar="SIG", help="files written by `fisherfast sketch`")
    align.add_argument("--kind", choices=("joint", "activation", "error"), default="joint")
    align.add_argument("--debiased", action="store_true", help="U-statistic norms (noisy for small n)")
    align.add_argument("--out", help="heatmap PNG path")
    align.set_defaults(func=cmd_align)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
