"""`fisherfast demo`: the main job on the embedded default model — the model's
own prediction, FisherSketch of verbalizer shifts (docs/design.md §7), the
pullback metric spectrum (§4) and FishBack vs Euclidean steering (§5).

Writes into ``--out``: fishersketch_verbalizers.png (heatmap),
metric_spectrum.png, and signatures/<task>.safetensors (one FisherSketch
state per verbalizer; ``fisherfast align`` reads them)."""
from __future__ import annotations

import os
import time

from fisherfast.cli._args import add_command
from fisherfast.cli._files import PLOT, SKETCH, check_folder_output, check_output, write_output
from fisherfast.cli._model import load_model, model_shape
from fisherfast.cli._report import COLUMN_NOTES, alignment_table, heatmap
from fisherfast.cli.spectrum import PLOT_CAPTION, surveys
from fisherfast.cli.steer import steer_report

HEATMAP, SPECTRUM, SIGNATURES = "fishersketch_verbalizers.png", "metric_spectrum.png", "signatures"
N_PROMPTS, METRIC_LAYER, STEER_LAYER = 8, 24, 24


def register(sub) -> None:
    p = add_command(sub, "demo", "the main job on the embedded default model",
                    description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    p.add_argument("--out", default="fisherfast-demo", metavar="FOLDER",
                   help=f"folder for {HEATMAP}, {SPECTRUM} and {SIGNATURES}/<task>.safetensors")
    p.add_argument("--force", action="store_true", help="replace earlier demo outputs in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=run)


def _outputs(folder: str, task_names, force: bool) -> dict[str, str]:
    """{name: absolute path} of every file the demo writes, each checked now."""
    paths = {HEATMAP: os.path.join(folder, HEATMAP), SPECTRUM: os.path.join(folder, SPECTRUM)}
    paths.update({name: os.path.join(folder, SIGNATURES, f"{name}.safetensors") for name in task_names})
    for name, path in paths.items():
        if os.path.isdir(os.path.dirname(path)):
            check_output(path, SKETCH if path.endswith(".safetensors") else PLOT, force=force, option="--out file")
    return paths


def _makedirs(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError:
        pass  # write_output falls back to another folder and says so


def _model_section(model, tokenizer) -> None:
    import torch

    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    top = logits.softmax(-1).topk(5)
    print(f"model: {model.config.model_type}, d={model.config.hidden_size}, V={model.config.vocab_size}, "
          f"layers={model.config.num_hidden_layers}")
    words = ", ".join(f"{tokenizer.decode(int(i))!r} {float(p):.3f}" for p, i in zip(top.values, top.indices))
    print(f"next token after {prompt!r}: {words}")


def _sketch_section(model, tokenizer, tasks, paths, progress: bool) -> bool:
    from fisherfast.sketch import SketchSpec, alignment
    from fisherfast.sketch.model import sketch_tasks

    spec = SketchSpec(d=model.config.hidden_size, K=model.get_output_embeddings().out_features, m=4096)
    start = time.perf_counter()
    states = sketch_tasks(model, tokenizer, tasks, spec=spec, progress=progress)
    print(f"{len(tasks)} verbalizers of the same {len(tasks[0].prompts)} review prompts "
          f"(e.g. {tasks[0].prompts[0]!r}), m={spec.m}, sketched in {time.perf_counter() - start:.1f} s")
    joint = alignment(states)
    print("head-Fisher alignment (FisherSketch): different answer tokens give near-orthogonal Fishers; "
          "swapping Yes/No on balanced labels does not move the second moment much")
    print(COLUMN_NOTES["A"])
    print(alignment_table(joint))
    print("activation marginal (same prompts, so activation-only similarity cannot tell them apart):")
    print(COLUMN_NOTES["S_a"])
    print(alignment_table(alignment(states, kind="activation"), "S_a"))
    ok = True
    for name, state in states.items():
        _makedirs(paths[name])
        ok &= write_output(paths[name], state.save, f"FisherSketch state of {name}")
    print(f"signatures: {os.path.dirname(paths[tasks[0].name])}/*.safetensors "
          f"(compare them with `fisherfast align`)")
    _makedirs(paths[HEATMAP])
    if write_output(paths[HEATMAP], lambda tmp: heatmap(joint, tmp, "FisherSketch head-Fisher alignment"),
                    "heatmap"):
        print(f"heatmap: {paths[HEATMAP]}")
    else:
        ok = False
    return ok


def _metric_section(model, tokenizer, paths, progress: bool) -> bool:
    from fisherfast.metric import plot_spectra, survey_table
    from fisherfast.prompts import NATURAL_PROMPTS

    prompts = NATURAL_PROMPTS[:3]
    start = time.perf_counter()
    result = surveys(model, tokenizer, [METRIC_LAYER], prompts, "exact", progress)
    print(f"exact pullback Fisher metric at layer {METRIC_LAYER}, last token of {len(prompts)} prompts "
          f"(e.g. {prompts[0]!r}), in {time.perf_counter() - start:.1f} s:")
    print(survey_table(result))
    _makedirs(paths[SPECTRUM])
    if not write_output(paths[SPECTRUM], lambda tmp: plot_spectra(result, tmp), "spectrum plot"):
        return False
    print(f"spectrum: {paths[SPECTRUM]} ({PLOT_CAPTION})")
    print("(FishBack on GPT-2: > 97% relative spectral deviation, PR/d 2–17%)")
    return True


def run(args) -> int:
    from fisherfast.sketch.tasks import verbalizer_tasks

    folder = check_folder_output(args.out)
    tasks = verbalizer_tasks(n=N_PROMPTS)
    paths = _outputs(folder, [task.name for task in tasks], args.force)
    model_shape("default")
    progress = not args.no_progress
    model, tokenizer = load_model("default", progress)
    print("\n== model ==")
    _model_section(model, tokenizer)
    print("\n== FisherSketch ==")
    ok = _sketch_section(model, tokenizer, tasks, paths, progress)
    print("\n== metric ==")
    ok &= _metric_section(model, tokenizer, paths, progress)
    print("\n== steering ==")
    steer_report(model, tokenizer, "The capital of France is", " London", STEER_LAYER, 0.5, ("fishback", "euclidean"),
                 6, progress)
    return 0 if ok else 1
