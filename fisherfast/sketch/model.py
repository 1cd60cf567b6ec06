"""FisherSketch of a Hugging Face causal LM over a dataset (docs/design.md §7).

For each sketched position t of each text, the head input a is the input of the
output embedding (``model.get_output_embeddings()``, i.e. the final normed
hidden state: RMSNorm for Llama, ln_f for GPT-2), captured by a forward
pre-hook, and the logits z = W a (+ b) are the model's own; the sketcher forms
e = p − e_y with p = softmax(z) over the full vocabulary (K = V). Taking the
head's actual input (rather than ``hidden_states[-1]``) makes a the exact
factor of the head gradient g = e ⊗ a for every architecture; the first batch
checks z = W a + b on one row, so a model whose logits are not an affine map of
that input (logit soft-capping or scaling) is rejected.

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

Cost: one forward pass per batch, then the sketch update of the selected rows
(2⌈m/N_V⌉ FWHTs of size N_V = 2^⌈log₂V⌉ and 2⌈m/N_d⌉ of size N_d per row).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fisherfast.sketch.sketcher import FisherSketcher
from fisherfast.sketch.spec import SketchSpec
from fisherfast.sketch.state import SketchState
from fisherfast.sketch.tasks import PromptTask

POSITIONS = ("all", "last")


def _token_lists(tokenizer, data, max_length: int | None) -> list[list[int]]:
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) or len(data) == 0:
        raise TypeError("texts_or_prompts must be a non-empty list of strings (or of token-id lists)")
    if all(isinstance(x, str) for x in data):
        if tokenizer is None:
            raise ValueError("tokenizer is required for string inputs (pass token-id lists to skip it)")
        ids = tokenizer(list(data), add_special_tokens=True)["input_ids"]
    elif all(isinstance(x, Sequence) and all(isinstance(i, int) for i in x) for x in data):
        ids = [list(x) for x in data]
    else:
        raise TypeError("texts_or_prompts must be all strings or all lists of int token ids")
    if max_length is not None:
        ids = [x[:max_length] for x in ids]
    return ids


def _check_head(head: torch.nn.Module, a_row: torch.Tensor, z_row: torch.Tensor) -> None:
    """The model's logits equal W a + b on one row (one K×d matrix-vector product)."""
    with torch.no_grad():
        expected = head(a_row[None])[0].float()
    z = z_row.float()
    if not torch.allclose(z, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max().clamp(min=1))):
        raise ValueError("the model's logits are not the output embedding applied to its input (soft-capping or "
                         "scaling after the head?); the head-Fisher sketch needs z = W a + b")


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


def sketch_model(model, tokenizer, texts_or_prompts, *, spec: SketchSpec | None = None, batch_size: int = 8,
                 labels="next_token", positions: str | None = None, sample: bool = False,
                 sample_seed: int | None = None, max_length: int | None = None, progress: bool = True,
                 backend: str | None = None):
    """Stream a causal LM over data and return the FisherSketch state of its head Fisher.

    Args:
        model: a Hugging Face causal LM (``model(input_ids, attention_mask)``
            returning ``.logits``) whose ``get_output_embeddings()`` is an nn.Linear.
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
        progress: show a tqdm progress bar over batches.
        backend: force an op backend for the sketch update.

    Returns:
        SketchState on the model's device (count = number of sketched
        positions), or {name: SketchState} for dict labels.

    Memory: for positions="all" a batch holds the model's B×T×V logits (pick
    ``batch_size`` for that); for "last" the model computes logits at the
    rows' last positions only (``logits_to_keep``, where it supports that).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if not isinstance(sample, bool):
        raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError("model must be a causal LM whose output embedding (get_output_embeddings()) is an nn.Linear")
    ids = _token_lists(tokenizer, texts_or_prompts, max_length)
    K, d = head.out_features, head.in_features

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

    device = head.weight.device
    sketchers = {name: FisherSketcher(spec, device=device, generator_seed=sample_seed, backend=backend)
                 for name in label_sets}
    # "last": ask the model for the logits at the rows' last positions only
    keep = positions == "last" and "logits_to_keep" in inspect.signature(model.forward).parameters
    captured = {}
    handle = head.register_forward_pre_hook(lambda module, args: captured.__setitem__("a", args[0]))
    try:
        for start in tqdm(range(0, len(ids), batch_size), desc="FisherSketch", unit="batch", disable=not progress):
            batch = ids[start:start + batch_size]
            lengths = torch.tensor([len(x) for x in batch], device=device)
            T = int(lengths.max())
            input_ids = torch.zeros(len(batch), T, dtype=torch.long, device=device)
            for row, x in enumerate(batch):
                input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            t = torch.arange(T, device=device)
            kwargs = {"attention_mask": (t[None, :] < lengths[:, None]).long()}
            if positions == "last":
                columns = torch.unique(lengths - 1)  # sorted distinct last positions
                if keep:
                    kwargs["logits_to_keep"] = columns
                column = torch.searchsorted(columns, lengths - 1) if keep else lengths - 1
            with torch.no_grad():
                logits = model(input_ids=input_ids, **kwargs).logits
            a = captured.pop("a")  # (B, T or len(columns), d), aligned with logits
            if a.shape[:2] != logits.shape[:2]:
                raise ValueError(f"the output embedding saw inputs of shape {tuple(a.shape)} for logits of shape "
                                 f"{tuple(logits.shape)}; the head must run once per forward pass")
            if positions == "all":  # position t predicts token t + 1 of the same text
                rows = t[None, :] < (lengths[:, None] - 1)
                a_rows, z_rows = a[rows], logits[rows]
                next_token = input_ids[:, 1:][rows[:, :-1]]
            else:
                batch_rows = torch.arange(len(batch), device=device)
                a_rows, z_rows = a[batch_rows, column], logits[batch_rows, column]
            if start == 0:
                _check_head(head, a_rows[0], z_rows[0])
            for name, sketcher in sketchers.items():
                if sample:
                    sketcher.update(a_rows, logits=z_rows, sample=True)
                else:
                    y = next_token if label_sets[name] is None else \
                        torch.tensor(label_sets[name][start:start + batch_size], device=device)
                    sketcher.update(a_rows, logits=z_rows, y=y)
    finally:
        handle.remove()
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
