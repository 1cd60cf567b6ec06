"""FisherSketch of a Hugging Face causal LM over a dataset (docs/design.md §7).

For each sketched position t of each text, the head input a is the final
normed hidden state (RMSNorm for Llama, ln_f for GPT-2), computed by
``fisherfast.split.final_head_inputs``: the model's own forward through its
decoder stack and final norm, *without* the LM head. The logits are the
model's own, ``fisherfast.split.Head``: z = s(W a + b), then the final
soft-cap c·tanh(z/c) where the model has one (Gemma-2/3). A linear logit
scale s (Cohere, Granite) is folded into the head input, a' = s a and
b' = s b, so z = W a' + b' exactly and the sketched g = e ⊗ a' is exactly
the gradient of the loss with respect to W. The fused op
``fisher_sketch_update`` takes W and b' and forms the logits chunk by chunk
(capping them with ``softcap=c`` where the head has a soft-cap). The sketcher
forms e = p − e_y with p = softmax(z) over the full vocabulary (K = V). Memory beyond the model's own forward (which,
without its head, holds B·T·d per layer, never B·T·V) is the selected rows'
a (rows × d) plus one chunk of logits (default 64 MB).

With soft-capping, p = softmax(c·tanh(z/c)) is the model's own distribution
and the sketched error is e = J_cap (p − e_y), J_cap = diag(1 − tanh²(z/c)),
so g = e ⊗ a' is exactly the gradient of the loss with respect to W (the op's
``softcap=``), streamed over the vocabulary like the rest.

Labels:

- ``labels="next_token"``: y_t = token t + 1 of the same text, at every
  position t that has a next token (``positions="all"``); padding is masked.
- ``labels=[id, ...]`` (one per prompt, a verbalizer): the prompt's last
  position predicts the answer token y, so e = p − e_y is the error of the
  language-model loss on the verbalized answer, over the full vocabulary. Two
  verbalizers of one prompt set share every a and differ only in y.
- ``sample=True``: y ∼ p at the chosen positions (the true Fisher; no labels).

Texts are batched with right padding and an attention mask, so the real tokens
keep the positions and outputs they have unpadded (causal attention never
looks right), and padded positions never enter the sketch.

Cost: one forward pass per batch without the head, then per selected row the
K·d logits GEMM and the sketch update (2⌈m/N_V⌉ FWHTs of size
N_V = 2^⌈log₂V⌉ and 2⌈m/N_d⌉ of size N_d).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fisherfast.sketch.sketcher import FisherSketcher
from fisherfast.sketch.spec import SketchSpec
from fisherfast.sketch.state import SketchState
from fisherfast.sketch.tasks import PromptTask
from fisherfast.split import Head, final_head_inputs, output_head
from fisherfast.split.positions import check_positions

POSITIONS = ("all", "last")


def _token_lists(tokenizer, data, max_length: int | None) -> list[list[int]]:
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) or len(data) == 0:
        raise TypeError("texts_or_prompts must be a non-empty list of strings (or of token-id lists)")
    if all(isinstance(x, str) for x in data):
        if tokenizer is None:
            raise ValueError("tokenizer is required for string inputs (pass token-id lists to skip it)")
        ids = tokenizer(list(data), add_special_tokens=True)["input_ids"]
    elif all(isinstance(x, Sequence) and not isinstance(x, (str, bytes))
             and all(isinstance(i, int) and not isinstance(i, bool) for i in x) for x in data):
        ids = [list(x) for x in data]
    else:
        raise TypeError("texts_or_prompts must be all strings or all lists of int token ids")
    if max_length is not None:
        ids = [x[:max_length] for x in ids]
    return ids


def check_sample_seed(sample_seed) -> None:
    if sample_seed is not None and (not isinstance(sample_seed, int) or isinstance(sample_seed, bool)
                                    or sample_seed < 0):
        raise ValueError(f"sample_seed must be a non-negative int or None, got {sample_seed!r}")


def check_stream_options(batch_size, max_length, sample, sample_seed, chunk_rows) -> None:
    """The options ``sketch_model`` and ``sketch_corpus`` share, checked before any work."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                   or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if not isinstance(sample, bool):
        raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
    check_sample_seed(sample_seed)
    check_chunk_rows(chunk_rows)


def check_input_ids(model, ids: list[list[int]]) -> None:
    """Token ids must index the model's input embedding, [0, V_in)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    V_in = getattr(embedding, "num_embeddings", None)
    if V_in is None:
        return
    for index, x in enumerate(ids):
        bad = [i for i in x if not 0 <= i < V_in]
        if bad:
            raise ValueError(f"texts_or_prompts[{index}]: token ids must be in [0, {V_in}) (the model's vocabulary), "
                             f"got {bad[0]}")


def model_head(model) -> Head:
    """The model's ``Head`` (``fisherfast.split.output_head``); TypeError for anything else."""
    try:
        return output_head(model)
    except (ValueError, AttributeError) as err:
        raise TypeError(f"model must be a causal LM of a supported architecture with a Linear output "
                        f"embedding: {err}") from None


def _check_label_list(name: str, labels, n: int, K: int) -> list[int]:
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    if not isinstance(labels, Sequence) or isinstance(labels, str) or \
            not all(isinstance(y, int) and not isinstance(y, bool) for y in labels):
        raise TypeError(f"{name} must be 'next_token' or a list of int token ids")
    if len(labels) != n:
        raise ValueError(f"{name} must hold one token id per prompt ({n}), got {len(labels)}")
    if any(not 0 <= y < K for y in labels):
        raise ValueError(f"{name} must be token ids in [0, {K})")
    return list(labels)


def check_chunk_rows(chunk_rows) -> None:
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")


def sketch_batch(model, head: Head, sketchers: dict, batch: list[list[int]], labels: dict, *,
                 positions: str, sample: bool, chunk_rows: int | None = None) -> int:
    """Add one batch of token-id lists to ``sketchers`` ({name: FisherSketcher});
    ``labels`` {name: one token id per text, or None for next-token labels}.
    Returns the number of real tokens in the batch (for progress bars)."""
    device = head.W.device
    lengths = torch.tensor([len(x) for x in batch], device=device)
    T = int(lengths.max())
    input_ids = torch.zeros(len(batch), T, dtype=torch.long, device=device)
    for row, x in enumerate(batch):
        input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    t = torch.arange(T, device=device)
    a = final_head_inputs(model, input_ids, (t[None, :] < lengths[:, None]).long())  # (B, T, d), no logits
    if head.scale != 1.0:  # z = W (s a) + s b: the sketched rows are a' = s a (module docstring)
        a = a * head.scale
    if positions == "all":  # position t predicts token t + 1 of the same text
        rows = t[None, :] < (lengths[:, None] - 1)
        a_rows, next_token = a[rows], input_ids[:, 1:][rows[:, :-1]]
    else:
        a_rows, next_token = a[torch.arange(len(batch), device=device), lengths - 1], None
    del a
    b_scaled = head.b if head.b is None or head.scale == 1.0 else head.b * head.scale
    # the op forms z = W a' + b' (and c·tanh(z/c)) chunk by chunk itself
    head_kwargs = dict(W=head.W, b=b_scaled, softcap=head.softcap, chunk_rows=chunk_rows)
    for name, sketcher in sketchers.items():
        y = None if sample else next_token if labels[name] is None else torch.tensor(labels[name], device=device)
        if sample:
            sketcher.update(a_rows, sample=True, **head_kwargs)
        else:
            sketcher.update(a_rows, y=y, **head_kwargs)
    return int(lengths.sum())


def sketch_model(model, tokenizer, texts_or_prompts, *, spec: SketchSpec | None = None, batch_size: int = 8,
                 labels="next_token", positions: str | None = None, sample: bool = False,
                 sample_seed: int | None = None, max_length: int | None = None, progress: bool = True,
                 backend: str | None = None, chunk_rows: int | None = None):
    """Stream a causal LM over data and return the FisherSketch state of its head Fisher.

    Args:
        model: a Hugging Face causal LM whose decoder stack ``fisherfast.split.architecture``
            finds and whose ``get_output_embeddings()`` is an nn.Linear (any
            decoder-only type, hybrid and state-space ones included).
        tokenizer: its tokenizer (unused when the data are token-id lists).
        texts_or_prompts: list of strings, or of token-id lists.
        spec: SketchSpec with d = hidden size and K = vocabulary size (the
            head's output width); default ``SketchSpec(d, K)`` (m = 4096, seed 0).
        batch_size: texts per forward pass.
        labels: "next_token"; or one verbalizer token id per prompt; or a dict
            {name: token ids} of several verbalizers of the same prompts,
            sketched from one forward pass (returns {name: SketchState}).
        positions: "all" (every position with a next token; the default for
            next-token labels) or "last" (each text's last token; the default,
            and the only choice, for verbalizer labels and labels=None).
        sample: draw y ∼ p instead (true Fisher); ``labels`` must be
            "next_token" or None and only selects the default positions.
        sample_seed: seed of the y ∼ p draws (default: the spec's seed).
        max_length: truncate each text to this many tokens.
        progress: show a tqdm progress bar (tokens, tokens/s).
        backend: force an op backend for the sketch update.
        chunk_rows: logits rows formed at once (default: 64 MB of float32).

    Returns:
        SketchState on the model's device (count = number of sketched
        positions), or {name: SketchState} for dict labels.

    Memory: the model's forward without its head, plus the selected rows' head
    inputs and one chunk of logits rows (see the module docstring); never
    B·T·V.

    Raises:
        TypeError/ValueError for bad arguments, before any forward pass;
        ValueError naming ``texts_or_prompts`` for a text longer than the
        model's positions (``max_length`` truncates), and ``model`` for a
        model in training mode.
    """
    check_stream_options(batch_size, max_length, sample, sample_seed, chunk_rows)
    head = model_head(model)
    ids = _token_lists(tokenizer, texts_or_prompts, max_length)
    check_input_ids(model, ids)
    check_positions(model, max(map(len, ids)), "texts_or_prompts")
    if model.training:
        raise ValueError("model: is in training mode (dropout makes the sketch random); call model.eval()")
    K, d = head.W.shape

    if isinstance(labels, str) and labels != "next_token":
        raise ValueError(f"labels must be 'next_token' or a list of token ids (one per prompt), got {labels!r}")
    if labels is None and not sample:
        raise ValueError("labels=None needs sample=True (y ∼ p)")
    verbalizer = not (labels is None or isinstance(labels, str))
    if verbalizer and sample:
        raise ValueError("sample=True draws y ∼ p; do not also give verbalizer labels")
    if isinstance(labels, dict):
        if not labels:
            raise ValueError("labels dict must name at least one verbalizer")
        label_sets = {str(name): _check_label_list(f"labels[{name!r}]", y, len(ids), K) for name, y in labels.items()}
    elif verbalizer:
        label_sets = {None: _check_label_list("labels", labels, len(ids), K)}
    else:
        label_sets = {None: None}
    positions = positions or ("last" if verbalizer or labels is None else "all")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if verbalizer and positions != "last":
        raise ValueError("verbalizer labels are one per prompt: positions must be 'last'")
    if not verbalizer and not sample and positions == "last":
        raise ValueError("next-token labels have no label after the last token; use positions='all', "
                         "verbalizer labels, or sample=True")
    min_len = 2 if positions == "all" else 1
    short = [i for i, x in enumerate(ids) if len(x) < min_len]
    if short:
        raise ValueError(f"texts {short[:5]} have fewer than {min_len} tokens (positions={positions!r})")
    spec = spec if spec is not None else SketchSpec(d=d, K=K)
    if not isinstance(spec, SketchSpec):
        raise TypeError(f"spec must be a SketchSpec, got {type(spec).__name__}")
    if (spec.d, spec.K) != (d, K):
        raise ValueError(f"spec must have d = {d} (hidden size) and K = {K} (vocabulary), got {spec}")

    sketchers = {name: FisherSketcher(spec, device=head.W.device, generator_seed=sample_seed, backend=backend)
                 for name in label_sets}
    with tqdm(total=sum(map(len, ids)), desc="FisherSketch", unit="tok", unit_scale=True,
              disable=not progress) as bar:
        for start in range(0, len(ids), batch_size):
            batch_labels = {name: None if y is None else y[start:start + batch_size] for name, y in label_sets.items()}
            bar.update(sketch_batch(model, head, sketchers, ids[start:start + batch_size], batch_labels,
                                    positions=positions, sample=sample, chunk_rows=chunk_rows))
    if isinstance(labels, dict):
        return {name: sketcher.state for name, sketcher in sketchers.items()}
    return sketchers[None].state


def sketch_task(model, tokenizer, task: PromptTask, **kwargs) -> SketchState:
    """``sketch_model`` over a PromptTask's prompts with its verbalizer token ids as labels."""
    if not isinstance(task, PromptTask):
        raise TypeError(f"task must be a PromptTask, got {type(task).__name__}")
    return sketch_model(model, tokenizer, list(task.prompts), labels=task.label_ids(tokenizer), **kwargs)


def sketch_tasks(model, tokenizer, tasks, **kwargs) -> dict[str, SketchState]:
    """{task name: SketchState} for several PromptTasks; tasks with the same
    prompts (verbalizer shifts) share one forward pass."""
    tasks = list(tasks)
    if not tasks or not all(isinstance(task, PromptTask) for task in tasks):
        raise TypeError("tasks must be a non-empty list of PromptTask")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    groups: dict[tuple[str, ...], dict[str, list[int]]] = {}
    for task in tasks:
        groups.setdefault(task.prompts, {})[task.name] = task.label_ids(tokenizer)
    states = {}
    for prompts, labels in groups.items():
        states.update(sketch_model(model, tokenizer, list(prompts), labels=labels, **kwargs))
    return {name: states[name] for name in names}
