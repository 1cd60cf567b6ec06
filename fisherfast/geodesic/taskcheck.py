"""Does a model carry a task, and where does injection control its answer? (docs/design.md §6)

A geodesic benchmark means something only where the carrier prompts carry the
concept: the model's next token is one of the task's concept tokens and the
right one. ``check_task`` measures that on a model; ``steerable_layers``
finds the layers where writing a class centroid into the carriers' last
position makes the model answer that class (on SmolLM2-135M-Instruct with
list carriers: from layer 24 on; at layers 8–20 the answer is read from
earlier tokens later in the network and injection leaves it at chance).

Measures, with q the concept distribution (``ConceptSchema``) of the
next-token distribution:
- accuracy: the fraction of prompts whose concept argmax over the K classes
  ("other" excluded) is the answer;
- top-1: the fraction whose most probable token of the whole vocabulary is
  the answer's concept token;
- concept mass: the mean of Σ_k q_k (1 − q_other);
- near chance: accuracy ≤ 1/K + 2·√((1/K)(1 − 1/K)/n) (two binomial
  standard deviations above guessing among K classes from n prompts).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fisherfast.checks import check_int, check_real
from fisherfast.geodesic.tasks import ConceptTask, TaskExample, check_examples
from fisherfast.split import SplitModel

__all__ = ["TaskCheck", "check_task", "LayerControl", "steerable_layers", "near_chance"]


def near_chance(accuracy: float, K: int, n: int) -> bool:
    """Whether ``accuracy`` over n prompts is within two binomial standard deviations of 1/K."""
    chance = 1.0 / K
    return accuracy <= chance + 2.0 * math.sqrt(chance * (1.0 - chance) / n)


@dataclasses.dataclass(frozen=True)
class TaskCheck:
    """``check_task``'s measures (module docstring) for ``n`` prompts of ``task`` with ``carrier``."""

    task: str
    carrier: str
    n: int
    accuracy: float
    top1: float
    concept_mass: float
    chance: float
    near_chance: bool


def _task_inputs(task, tokenizer, examples):
    if not isinstance(task, ConceptTask):
        raise TypeError(f"task: expected a ConceptTask, got {type(task).__name__}")
    examples = check_examples(task.examples() if examples is None else examples)
    for e in examples:
        if e.answer_index >= task.n_classes or task.classes[e.answer_index] != e.answer:
            raise ValueError(f"examples: {e.answer!r} (index {e.answer_index}) is not a class of {task.name!r}")
    ids = [task.prompt_ids(tokenizer, e.prompt) for e in examples]
    return examples, ids


def check_task(split: SplitModel, task: ConceptTask, tokenizer, examples: Sequence[TaskExample] | None = None, *,
               warn: bool = True, progress: bool = False) -> TaskCheck:
    """Accuracy, top-1 and concept mass of ``task``'s carriers on the model of ``split``.

    Args:
        split: a ``SplitModel`` (its layer does not matter: the model's own
            state is used).
        task: a ``ConceptTask``; examples: its prompts (default ``task.examples()``).
        tokenizer: the model's tokenizer.
        warn: emit a RuntimeWarning when the accuracy is near chance.

    Cost: one forward pass per example.
    """
    if not isinstance(split, SplitModel):
        raise TypeError(f"split: expected a SplitModel, got {type(split).__name__}")
    examples, ids = _task_inputs(task, tokenizer, examples)
    schema = task.schema(tokenizer, split.V)
    correct, top1, mass = 0, 0, 0.0
    for e, prompt_ids in tqdm(list(zip(examples, ids)), desc=f"check {task.name}", disable=not progress,
                              leave=False):
        ctx = split.context(prompt_ids)
        with torch.no_grad():
            logits = split.logits(ctx, ctx.h)
        q = schema.distribution(logits)
        correct += int(q[:-1].argmax()) == e.answer_index
        top1 += int(logits.argmax()) in schema.token_sets[e.answer_index].tolist()
        mass += float(1.0 - q[-1])
    n = len(examples)
    accuracy = correct / n
    result = TaskCheck(task.name, task.carrier, n, accuracy, top1 / n, mass / n, 1.0 / task.n_classes,
                       near_chance(accuracy, task.n_classes, n))
    if warn and result.near_chance:
        warnings.warn(f"task {task.name!r} ({task.carrier} carrier): accuracy {accuracy:.2f} over {n} prompts is "
                      f"near chance ({1 / task.n_classes:.2f}); its carriers do not carry the concept on this model",
                      RuntimeWarning, stacklevel=2)
    return result


@dataclasses.dataclass(frozen=True)
class LayerControl:
    """Injection control at one layer: ``accuracy`` is the fraction of (carrier, class k)
    pairs whose concept argmax is k after writing centroid k into the carrier;
    ``target_mass`` the mean q_k there; ``steerable``: accuracy ≥ the threshold."""

    layer: int
    accuracy: float
    target_mass: float
    steerable: bool


def steerable_layers(model, task: ConceptTask, tokenizer, layers: Sequence[int],
                     examples: Sequence[TaskExample] | None = None, *, threshold: float = 0.85,
                     progress: bool = False) -> list[LayerControl]:
    """For each layer ℓ in ``layers``: the class centroids at ℓ (mean last-position state
    of the examples answering each class, as ``class_centroids``) injected into every
    example's last position; how often the model then answers the injected class.

    Args:
        model: a Hugging Face causal LM (split at each layer with ``SplitModel``).
        task, tokenizer: the task; examples: its prompts (default
            ``task.examples()``; every class needs one).
        layers: layer indices.
        threshold: accuracy at or above which a layer counts as steerable.

    Cost per layer: one lower pass per example and one upper pass of K states per example.
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers: expected a non-empty sequence of layer indices, got {layers!r}")
    check_real("threshold", threshold, minimum=0, maximum=1)
    first = SplitModel(model, layers[0])  # checks the model and the first layer
    for layer in layers:  # every layer before any work
        check_int("layers", layer, minimum=0, maximum=first.num_layers)
    examples, ids = _task_inputs(task, tokenizer, examples)
    missing = sorted(set(range(task.n_classes)) - {e.answer_index for e in examples})
    if missing:
        raise ValueError(f"examples: no example answers {[task.classes[k] for k in missing]}; every class needs one")
    labels = torch.tensor([e.answer_index for e in examples])
    out = []
    for layer in tqdm(layers, desc=f"{task.name} layers", disable=not progress, leave=False):
        split = first if layer == first.layer else SplitModel(model, layer)
        schema = task.schema(tokenizer, split.V)
        contexts = [split.context(i) for i in ids]
        H = torch.stack([ctx.h for ctx in contexts])
        C = torch.stack([H[labels == k].mean(0) for k in range(task.n_classes)])
        with torch.no_grad():
            Q = torch.stack([schema.distribution(split.logits(ctx, C)) for ctx in contexts])   # (n, K, B)
        diagonal = Q[:, torch.arange(task.n_classes), torch.arange(task.n_classes)]
        accuracy = float((Q[..., :-1].argmax(-1) == torch.arange(task.n_classes)).double().mean())
        out.append(LayerControl(layer, accuracy, float(diagonal.mean()), accuracy >= threshold))
    return out
