"""`fisherfast sketch`: the FisherSketch state of a text file (docs/design.md §7),
next-token labels at every position, saved as a versioned safetensors file."""
from __future__ import annotations

import time

from fisherfast.cli._args import UsageError, add_command, nonnegative_int, note, positive_int, read_lines
from fisherfast.cli._files import SKETCH, check_output, write_output
from fisherfast.cli._model import MODEL_HELP, load_model, model_shape


def register(sub) -> None:
    p = add_command(sub, "sketch", "FisherSketch state of a text file (one text per line)")
    p.add_argument("--texts", required=True, metavar="FILE", help="UTF-8 text file, one text per non-empty line")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file (sums, count and spec)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an existing FisherSketch file")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--m", type=positive_int, default=4096, help="number of features (signature size)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="spec seed; only states of equal seeds align")
    p.add_argument("--batch-size", type=positive_int, default=8, help="texts per forward pass")
    p.add_argument("--max-length", type=positive_int, default=512,
                   help="truncate each text to this many tokens (a notice says how many were)")
    p.add_argument("--sample", action="store_true", help="y ~ p (true Fisher) instead of the next token")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=run)


def _spec(d: int, K: int, m: int, seed: int):
    from fisherfast.sketch import SketchSpec

    try:
        return SketchSpec(d=d, K=K, m=m, seed=seed)
    except ValueError as err:
        raise UsageError(f"bad --m/--seed: {err}") from None


def run(args) -> int:
    out = check_output(args.out, SKETCH, force=args.force)
    texts = read_lines(args.texts, "--texts")
    model_shape(args.model)  # the model can be loaded here

    from fisherfast.sketch.model import sketch_model

    model, tokenizer = load_model(args.model, not args.no_progress)
    head = model.get_output_embeddings()
    spec = _spec(head.in_features, head.out_features, args.m, args.seed)
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    long = sum(len(x) > args.max_length for x in ids)
    if long:
        note(f"{long} of {len(ids)} texts are longer than --max-length {args.max_length} tokens "
             f"(longest {max(map(len, ids))}); only their first {args.max_length} tokens are sketched")
    ids = [x[:args.max_length] for x in ids]
    short = sum(len(x) < 2 for x in ids)
    if short == len(ids):
        raise UsageError(f"--texts {args.texts}: every text is shorter than 2 tokens; nothing to sketch")
    if short:  # a one-token text has no position with a next token
        note(f"{short} of {len(ids)} texts are a single token and were skipped")
        ids = [x for x in ids if len(x) >= 2]
    start = time.perf_counter()
    state = sketch_model(model, tokenizer, ids, spec=spec, batch_size=args.batch_size, sample=args.sample,
                         progress=not args.no_progress)
    print(f"{len(ids)} texts, {state.count} positions sketched in {time.perf_counter() - start:.1f} s "
          f"under {spec}")
    written = write_output(out, state.save, "FisherSketch state")
    if written:
        print(f"wrote {args.out} (state {state.nbytes} bytes; signature {state.signature().nbytes} bytes)")
    return 0 if written else 1
