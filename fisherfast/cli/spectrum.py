"""`fisherfast spectrum`: pullback Fisher metric diagnostics at one or more
layers (docs/design.md §4) and a plot of the eigenvalue spectra."""
from __future__ import annotations

import time

from fisherfast.cli._args import UsageError, add_command, open_unit_float, positive_int, read_text
from fisherfast.cli._files import PLOT, check_output, write_output
from fisherfast.cli._model import MODEL_HELP, load_model, model_shape
from fisherfast.cli._progress import steps

PLOT_CAPTION = ("normalized eigenvalues λ_i/λ_1 per layer: solid line = median over prompts, shaded band = "
                "10–90% range over prompts, dashed = the metric averaged over prompts")


def register(sub) -> None:
    p = add_command(sub, "spectrum", "pullback-metric diagnostics + eigenvalue spectrum plot")
    p.add_argument("--layer", type=int, nargs="+", required=True, metavar="L",
                   help="layer(s) ℓ ∈ [0, L]: h is the input of block ℓ")
    p.add_argument("--prompts", metavar="FILE", help="UTF-8 file, one prompt per non-empty line, a literal \\n for a newline "
                                     "(default: the built-in natural prompts)")
    p.add_argument("--max-prompts", type=positive_int, metavar="N", help="use only the first N prompts")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--mode", choices=("exact", "topk"), default="exact", help="metric mode")
    p.add_argument("--tail-tol", type=open_unit_float, default=1e-3,
                   help="top-k tail mass tolerance τ (--mode topk)")
    p.add_argument("--out", default="fisherfast-spectrum.png",
                   metavar="FILE",
                   help="spectrum plot (.png, .pdf or .svg): " + PLOT_CAPTION.replace("%", "%%"))
    p.add_argument("--force", action="store_true", help="replace --out if it is an existing plot")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=run)


def _prompts(path: str | None, limit: int | None) -> list[str]:
    from fisherfast.prompts import load_prompts

    if path is not None:
        read_text(path, "--prompts")  # missing, unreadable or non-UTF-8: one line naming the option
    try:
        prompts = load_prompts(path)
    except ValueError as err:
        raise UsageError(f"--prompts: {err}") from None
    return prompts[:limit] if limit is not None else prompts


def surveys(model, tokenizer, layers, prompts, mode: str, progress: bool, **options):
    """One SpectrumSurvey per layer, over the last token of each prompt."""
    from fisherfast.metric import spectrum_survey
    from fisherfast.split import SplitModel

    ids = [tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts]
    result = []
    for layer in steps(layers, "layers", progress and len(layers) > 1):
        split = SplitModel(model, layer)
        result.append(spectrum_survey(split, split.contexts(ids), mode=mode, progress=progress, **options))
    return result


def run(args) -> int:
    out = check_output(args.out, PLOT, force=args.force)
    prompts = _prompts(args.prompts, args.max_prompts)
    model_shape(args.model).check_layers(args.layer)
    repeated = sorted({layer for layer in args.layer if args.layer.count(layer) > 1})
    if repeated:
        raise UsageError(f"--layer {repeated[0]} is given more than once (each layer is one row and one curve)")

    from fisherfast.metric import plot_spectra, survey_table

    model, tokenizer = load_model(args.model, not args.no_progress)
    options = {"tail_tol": args.tail_tol} if args.mode == "topk" else {}
    start = time.perf_counter()
    result = surveys(model, tokenizer, args.layer, prompts, args.mode, not args.no_progress, **options)
    print(f"{args.mode} pullback Fisher metric, last token of {len(prompts)} prompts, "
          f"{time.perf_counter() - start:.1f} s:")
    print(survey_table(result))
    written = write_output(out, lambda tmp: plot_spectra(result, tmp), "spectrum plot")
    if written:
        print(f"spectrum: {args.out} ({PLOT_CAPTION})")
    return 0 if written else 1
