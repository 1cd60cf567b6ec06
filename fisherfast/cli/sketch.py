"""`fisherfast sketch`: the FisherSketch state of a corpus (docs/design.md §7),
saved as a versioned safetensors file.

The corpus is a text file (one text per line) or a local Hugging Face
`datasets` file or folder (jsonl, parquet, arrow) read with ``--text-field``
(next-token labels at every position) or ``--prompt-field``/``--answer-field``
(a verbalizer task: the answer's token at the prompt's last position).

Many processes: ``torchrun --nproc-per-node N -m fisherfast sketch ...`` (one
machine or several, as torchrun sets them up) gives rank r the batches r, r+N,
… of one process's batching, merges the states with an all-reduce and rank 0
writes the file; the result equals one process's with the same --batch-size
and threads per process (counts exactly, sums to float64 round-off). Backend:
NCCL when CUDA is available (each rank on cuda:LOCAL_RANK), else gloo. Under
torchrun write ``--m`` as ``--features``: torchrun's parser reads every
argument and rejects ``--m`` as an ambiguous abbreviation of its own options.
"""
from __future__ import annotations

import os
import sys
import time

from fisherfast.cli._args import UsageError, add_command, nonnegative_int, note, positive_int, read_text
from fisherfast.cli._files import SKETCH, check_output, write_output
from fisherfast.cli._model import MODEL_HELP, load_model, model_shape


def register(sub) -> None:
    p = add_command(sub, "sketch", "FisherSketch state of a text file or a local datasets corpus")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--texts", metavar="FILE",
                        help="UTF-8 text file, one text per non-empty line (lines end at \\n or \\r\\n; "
                             "a leading BOM is dropped)")
    source.add_argument("--dataset", metavar="PATH",
                        help="local datasets file or folder (jsonl, parquet, arrow), streamed")
    p.add_argument("--text-field", metavar="NAME", help="--dataset column of texts (next-token labels)")
    p.add_argument("--prompt-field", metavar="NAME", help="--dataset column of prompts (with --answer-field)")
    p.add_argument("--answer-field", metavar="NAME", help="--dataset column of one-token answers")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file (sums, count and spec)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an existing FisherSketch file")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--m", "--features", dest="m", type=positive_int, default=4096,
                   help="number of features m (signature size); under torchrun spell it --features "
                        "(torchrun's own parser takes --m for an ambiguous abbreviation)")
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


def _dataset_fields(args) -> dict:
    """The --dataset column options as sketch_corpus keywords, or a UsageError (also for a
    corpus without those fields: checked on its first row, before any model loads)."""
    fields = {"text_field": args.text_field, "prompt_field": args.prompt_field, "answer_field": args.answer_field}
    if args.texts is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in fields.items() if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only to --dataset, "
                             f"not --texts")
        return {}
    if (args.text_field is None) == (args.prompt_field is None):
        raise UsageError("--dataset needs --text-field, or --prompt-field with --answer-field")
    if (args.prompt_field is None) != (args.answer_field is None and not args.sample):
        raise UsageError("--prompt-field needs --answer-field (or --sample), and --answer-field needs --prompt-field")
    if not os.path.exists(args.dataset):
        raise UsageError(f"--dataset {args.dataset}: no such file or folder")
    from fisherfast.sketch.corpus import check_corpus

    try:  # the suffix and the fields, from the first row: before any model loads
        check_corpus(args.dataset, **{k: v for k, v in fields.items() if v is not None})
    except (OSError, ValueError, TypeError, ImportError) as err:
        raise UsageError(f"--dataset {args.dataset}: {err}") from None
    return fields


def read_texts(path: str, option: str = "--texts") -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped, as Python's text files
    read them: a leading byte-order mark is dropped and lines end only at \\n or
    \\r\\n (a form feed, U+2028 or a lone \\r stays inside its text, unlike
    ``str.splitlines``). UsageError naming ``option`` if none or unreadable."""
    text = read_text(path, option).removeprefix("\ufeff")
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        raise UsageError(f"{option} {path} holds no non-empty line")
    return lines


def _notices(args, texts: list[str], tokenizer) -> None:
    """Notices for --texts lines that are truncated or too short to sketch."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    long = sum(len(x) > args.max_length for x in ids)
    if long:
        note(f"{long} of {len(ids)} texts are longer than --max-length {args.max_length} tokens "
             f"(longest {max(map(len, ids))}); only their first {args.max_length} tokens are sketched")
    short = sum(len(x[:args.max_length]) < 2 for x in ids)
    if short == len(ids):
        raise UsageError(f"--texts {args.texts}: every text is shorter than 2 tokens; nothing to sketch")
    if short:  # a one-token text has no position with a next token
        note(f"{short} of {len(ids)} texts are a single token and were skipped")


def run(args) -> int:
    from fisherfast.sketch import sketch_corpus
    from fisherfast.sketch.corpus import init_distributed_from_env

    out = check_output(args.out, SKETCH, force=args.force)
    fields = _dataset_fields(args)
    texts = read_texts(args.texts) if args.texts is not None else None  # checked before the load
    model_shape(args.model)  # the model can be loaded here
    distributed = init_distributed_from_env()
    rank = _rank() if distributed else 0
    model, tokenizer = load_model(args.model, not args.no_progress and rank == 0)
    if distributed and _cuda_ranks():
        model.to(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    head = model.get_output_embeddings()
    spec = _spec(head.in_features, head.out_features, args.m, args.seed)
    if texts is not None:
        _notices(args, texts, tokenizer)
    source = texts if texts is not None else args.dataset
    start = time.perf_counter()
    try:
        state = sketch_corpus(model, tokenizer, source, spec=spec, batch_size=args.batch_size,
                              max_length=args.max_length, sample=args.sample, progress=not args.no_progress,
                              **fields)
    except (ValueError, TypeError) as err:  # a bad item or column of the corpus
        raise UsageError(f"{args.texts or args.dataset}: {err}") from None
    written = True
    if rank == 0:
        print(f"{state.count} positions sketched in {time.perf_counter() - start:.1f} s under {spec}"
              + (f" by {_world()} processes" if distributed else ""))
        written = write_output(out, state.save, "FisherSketch state")
        if written:
            print(f"wrote {args.out} (state {state.nbytes} bytes; signature {state.signature().nbytes} bytes)")
    if distributed:
        _leave_process_group(0 if written else 1)
    return 0 if written else 1


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank()


def _world() -> int:
    import torch.distributed as dist
    return dist.get_world_size()


def _cuda_ranks() -> bool:
    import torch.distributed as dist
    return dist.get_backend() == "nccl"


def _leave_process_group(code: int) -> None:
    """Every rank waits for rank 0's write, leaves the group and exits at once:
    gloo's worker threads can abort a process at interpreter teardown after the
    group is destroyed (a torch race), after the work is safely written."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
