"""FisherSketch over a real corpus: local Hugging Face ``datasets`` files,
streamed, sharded across torch.distributed ranks (docs/design.md §7).

``read_corpus(path, text_field=...)`` yields texts (``check_corpus`` checks
the path and fields first, reading one row); ``read_corpus(path,
prompt_field=..., answer_field=...)`` yields (prompt, answer) pairs for a
verbalizer task (the answer is one token: the label at the prompt's last
position). Files are read with ``datasets.load_dataset(builder,
data_files=..., streaming=True)``, so a corpus is never held in memory:
``.jsonl``/``.json`` (builder "json"), ``.parquet`` ("parquet") and ``.arrow``
("arrow": the files ``Dataset.save_to_disk`` writes). A folder means its files
of the first of those suffixes present (.arrow, .parquet, .jsonl, .json), sorted
by name.

``sketch_corpus`` streams such a source (or any iterable of texts or pairs)
through ``sketch_model``'s batch step. When torch.distributed is initialized,
the items are cut into batches of ``batch_size`` consecutive items exactly as
one process cuts them, rank r of N takes batches r, r + N, r + 2N, … and the
ranks' states are summed with ``all_reduce_state``, so every rank (rank 0
writes the file) ends with the state of the whole corpus: counts exactly
equal to a single process's, and sums equal to a single process's with the
same batch size and threads per process up to float64 summation order (each
batch is the same forward pass, bit for bit). Batching by items instead
would put a row beside other rows and padding than in one process, and a
float32 model's batched forward rounds differently then (6.6e-5 relative on
a sum that cancels; issue 18.3).
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

from fisherfast.sketch.distributed import all_reduce_state
from fisherfast.sketch.model import check_stream_options, model_head, sketch_batch
from fisherfast.sketch.sketcher import FisherSketcher
from fisherfast.sketch.spec import SketchSpec
from fisherfast.sketch.state import SketchState

BUILDERS = {".arrow": "arrow", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def _data_files(path) -> tuple[str, list[str]]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike (a corpus file or folder), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):  # the files of the first suffix present in BUILDERS' order (save_to_disk: .arrow)
        names = sorted(os.listdir(path))
        suffix = next((x for x in BUILDERS if any(os.path.splitext(f)[1] == x for f in names)), None)
        if suffix is None:
            raise ValueError(f"path: no {'/'.join(BUILDERS)} files in the folder {path}")
        return BUILDERS[suffix], [os.path.join(path, f) for f in names if os.path.splitext(f)[1] == suffix]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no corpus file or folder at {path}")
    suffix = os.path.splitext(path)[1]
    if suffix not in BUILDERS:
        raise ValueError(f"path: expected a file ending in one of {list(BUILDERS)}, got {path}")
    return BUILDERS[suffix], [path]


def _open(path, text_field, prompt_field, answer_field) -> tuple[list[str], dict | None, Iterator[dict]]:
    """The fields to read, the first row (None for an empty corpus) and the rows after it."""
    if (text_field is None) == (prompt_field is None and answer_field is None):
        raise ValueError("give text_field, or prompt_field and answer_field (not both)")
    if text_field is None and (prompt_field is None or answer_field is None):
        raise ValueError("a verbalizer corpus needs both prompt_field and answer_field")
    fields = [text_field] if text_field is not None else [prompt_field, answer_field]
    if not all(isinstance(f, str) and f for f in fields):
        raise TypeError(f"field names must be non-empty strings, got {fields}")
    builder, files = _data_files(path)
    try:
        import datasets
    except ImportError as err:
        raise ImportError("reading corpus files needs the datasets package: pip install 'fisherfast[data]'") from err
    try:
        rows = iter(datasets.load_dataset(builder, data_files=files, split="train", streaming=True))
        first = next(rows, None)
    except StopIteration:  # an empty file: datasets finds no first row to infer the columns from
        rows, first = iter(()), None
    missing = [f for f in fields if first is not None and f not in first]
    if missing:
        raise ValueError(f"{os.fspath(path)} has no field {missing[0]!r}; its fields are {sorted(first)}")
    return fields, first, rows


def check_corpus(path: str | os.PathLike, *, text_field: str | None = None, prompt_field: str | None = None,
                 answer_field: str | None = None) -> None:
    """Check what ``read_corpus`` checks before its first item (the field choice, the path, its
    suffix and that its first row has the fields), reading one row: a caller checks a corpus
    before loading a model. Raises as ``read_corpus``."""
    _open(path, text_field, prompt_field, answer_field)


def read_corpus(path: str | os.PathLike, *, text_field: str | None = None, prompt_field: str | None = None,
                answer_field: str | None = None) -> Iterator[str | tuple[str, str]]:
    """Stream a local datasets file (or folder) as texts or (prompt, answer) pairs.

    Args:
        path: a .jsonl/.json, .parquet or .arrow file, or a folder of them.
        text_field: the column holding each text; or
        prompt_field, answer_field: the columns of a verbalizer task.

    Yields:
        str per row (text_field), or (prompt, answer) per row.

    Raises (before the first item): ValueError for a bad field choice, a field
    the file lacks (naming the fields it has) or an unknown suffix;
    FileNotFoundError for a missing path; ImportError without ``datasets``
    (``pip install 'fisherfast[data]'``). A row whose field is not a string
    raises TypeError naming the row.
    """
    fields, first, rows = _open(path, text_field, prompt_field, answer_field)
    if first is None:
        return iter(())
    return _values(itertools.chain([first], rows), fields, os.fspath(path))


def _values(rows, fields: list[str], path: str) -> Iterator[str | tuple[str, str]]:
    for index, row in enumerate(rows):
        values = [row[f] for f in fields]
        bad = [f for f, v in zip(fields, values) if not isinstance(v, str)]
        if bad:
            raise TypeError(f"{path}: row {index} field {bad[0]!r} is {type(row[bad[0]]).__name__}, expected str")
        yield values[0] if len(values) == 1 else tuple(values)


def shard(items: Iterable, rank: int, world_size: int) -> Iterator:
    """Items rank, rank + world_size, rank + 2·world_size, … of ``items`` (``sketch_corpus``
    shards batches with it)."""
    return itertools.islice(items, rank, None, world_size)


def init_distributed_from_env(backend: str | None = None) -> bool:
    """Initialize torch.distributed from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; ``env://``) when it is set and no group exists yet.

    backend: default "nccl" when CUDA is available (the current device is then
    set to LOCAL_RANK), else "gloo". Returns True when a process group is
    initialized on return (False outside torchrun)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, init_method="env://")
    return True


def _distributed(group) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class _Labeler:
    """Answer string → its single token id (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, {}

    def __call__(self, answer: str) -> int:
        if answer not in self.ids:
            tokens = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise ValueError(f"answer {answer!r} is {len(tokens)} tokens for this tokenizer; a verbalizer "
                                 f"answer must be exactly one")
            self.ids[answer] = tokens[0]
        return self.ids[answer]


def sketch_corpus(model, tokenizer, source, *, spec: SketchSpec | None = None, text_field: str | None = None,
                  prompt_field: str | None = None, answer_field: str | None = None, batch_size: int = 8,
                  max_length: int | None = None, sample: bool = False, sample_seed: int | None = None,
                  progress: bool = True, backend: str | None = None, chunk_rows: int | None = None,
                  group=None) -> SketchState:
    """FisherSketch state of a causal LM's head Fisher over a corpus, sharded across ranks.

    Args:
        model, tokenizer: a supported Hugging Face causal LM and its tokenizer
            (as ``sketch_model``).
        source: a path (file or folder, read with ``read_corpus`` and the field
            names below), or an iterable of texts, or of (prompt, answer) pairs.
        spec: SketchSpec (d = hidden size, K = vocabulary); default SketchSpec(d, K).
        text_field / prompt_field, answer_field: the columns to read from a path.
        batch_size: items per forward pass; under torch.distributed rank r takes
            batches r, r + N, … of the single-process batching.
        max_length: truncate each text or prompt to this many tokens.
        sample: y ∼ p (true Fisher) at every position with a next token (texts)
            or at each prompt's last token (pairs: the answers are then unused).
            Each rank draws from generator seed ``sample_seed`` (default: the
            spec's seed) + rank, so sharded draws differ from one process's.
        progress: tqdm bar on rank 0 with the tokens read and tokens/s.
        backend, chunk_rows: as ``sketch_model``.
        group: the torch.distributed group (default: the world, when initialized).

    Texts get next-token labels at every position with a next token (texts of
    fewer than 2 tokens are skipped); pairs get the answer's single token id as
    the label at the prompt's last position.

    Returns:
        SketchState of the whole corpus on every rank (all_reduce_state when
        torch.distributed is initialized; a collective: every rank must call).

    Raises:
        ValueError/TypeError for bad arguments or items (mixed texts and pairs,
        a multi-token answer, a missing field), before the item is sketched.
    """
    check_stream_options(batch_size, max_length, sample, sample_seed, chunk_rows)
    head = model_head(model)
    K, d = head.W.shape
    spec = spec if spec is not None else SketchSpec(d=d, K=K)
    if not isinstance(spec, SketchSpec):
        raise TypeError(f"spec: expected a SketchSpec, got {type(spec).__name__}")
    if (spec.d, spec.K) != (d, K):
        raise ValueError(f"spec: expected d = {d} (hidden size) and K = {K} (vocabulary), got {spec}")
    if tokenizer is None:
        raise ValueError("tokenizer is required")
    if isinstance(source, (str, os.PathLike)):
        items = read_corpus(source, text_field=text_field, prompt_field=prompt_field, answer_field=answer_field)
    elif isinstance(source, Iterable) and not isinstance(source, bytes):
        if text_field is not None or prompt_field is not None or answer_field is not None:
            raise ValueError("field names apply to a path source, not to an iterable of items")
        items = iter(source)
    else:
        raise TypeError(f"source: expected a path or an iterable of texts or (prompt, answer) pairs, "
                        f"got {type(source).__name__}")
    rank, world = _distributed(group)
    base_seed = spec.seed if sample_seed is None else sample_seed
    sketcher = FisherSketcher(spec, device=head.W.device, generator_seed=base_seed + rank, backend=backend)
    labeler, kind = _Labeler(tokenizer), None
    with tqdm(desc=f"FisherSketch (rank {rank}/{world})" if world > 1 else "FisherSketch", unit="tok",
              unit_scale=True, disable=not progress or rank != 0) as bar:
        for batch in shard(_batches(items, batch_size), rank, world):  # whole batches: see the module docstring
            kind = kind or _kind(batch[0])
            if any(_kind(item) != kind for item in batch):
                raise TypeError("source must hold only texts or only (prompt, answer) pairs")
            texts = batch if kind == "text" else [prompt for prompt, _ in batch]
            ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
            ids = [x[:max_length] for x in ids] if max_length is not None else ids
            if kind == "text":
                ids = [x for x in ids if len(x) >= 2]
                labels = None
            else:
                if any(len(x) == 0 for x in ids):
                    raise ValueError("a prompt encodes to no tokens")
                labels = None if sample else [labeler(answer) for _, answer in batch]
            if ids:
                bar.update(sketch_batch(model, head, {None: sketcher}, ids, {None: labels},
                                        positions="all" if kind == "text" else "last", sample=sample,
                                        chunk_rows=chunk_rows))
    state = sketcher.state
    return all_reduce_state(state, group) if world > 1 else state


def _kind(item) -> str:
    if isinstance(item, str):
        return "text"
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return "pair"
    raise TypeError(f"source items must be texts (str) or (prompt, answer) pairs of str, got {item!r:.80}")


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, size)):
        yield batch
