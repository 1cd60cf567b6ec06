"""Built-in ordinal concept tasks for geodesic steering (docs/design.md §6).

Each task asks for the class ``step`` places after a start class x:

    weekdays  "Q: What day is {n} days after {x}?\\nA:"            Monday..Sunday, cyclic
    months    "Q: What month is {n} months after {x}?\\nA:"        January..December, cyclic
    letters   "Q: What letter is {n} letters after {x}?\\nA:"      A..Z
    ages      "Q: How old is someone {n} years after turning {x}?\\nA:"   10, 20, .., 90 (n = 10·step)

The answer to a prompt is the class (index(x) + step) mod K for cyclic tasks
and index(x) + step otherwise (prompts whose answer would fall off the end
are not generated). A prompt shows n = step · ``step_size``.

Concept schema (for a given tokenizer): the answer text of class k is " " +
class (the model answers after "A:"). Its concept token is the first token
of tokenizer.encode(" " + class): " Monday" for weekdays. Where every
answer's encoding starts with the same tokens (a digit-splitting tokenizer
encodes " 30" as " ", "3", "0"), that common prefix is the *answer prefix*:
it is appended to each prompt's ids (``prompt_ids``) so the model's next
token is the first distinguishing one, which is then the concept token
("3" for " 30"). Concept token sets must be disjoint (the schema rules of
``fisherfast.metric``); a tokenizer under which two classes share their
concept token is an error. Tokenizers are used only through ``encode``
(with ``add_special_tokens=False`` for answers when its signature accepts
it; prompts are encoded with the tokenizer's defaults).
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fisherfast.geodesic.concepts import ConceptSchema
from fisherfast.split import SplitModel

__all__ = ["ConceptTask", "TaskExample", "WEEKDAYS", "MONTHS", "LETTERS", "AGES", "TASKS", "get_task",
           "class_centroids"]


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One prompt: ``prompt`` asks for the class ``step`` after ``start``; ``answer`` (index ``answer_index``)."""

    prompt: str
    start: str
    step: int
    answer: str
    answer_index: int


@dataclasses.dataclass(frozen=True)
class ConceptTask:
    """An ordinal concept task (module docstring).

    Attributes:
        name: the task's name.
        classes: the K class strings in order.
        template: the prompt, with fields {n} and {x}.
        cyclic: whether the classes wrap around (periodic spline, modular answers).
        step_size: the number shown in the prompt is n = step · step_size.
    """

    name: str
    classes: tuple[str, ...]
    template: str
    cyclic: bool
    step_size: int = 1

    def __post_init__(self):
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes: expected at least 2 distinct classes, got {self.classes!r}")
        if "{n}" not in self.template or "{x}" not in self.template:
            raise ValueError(f"template: expected the fields {{n}} and {{x}}, got {self.template!r}")

    @property
    def K(self) -> int:
        return len(self.classes)

    def prompt(self, start: str, step: int) -> str:
        """The template with x = ``start`` and n = step · step_size."""
        self._index(start)
        return self.template.format(n=_check_step(step) * self.step_size, x=start)

    def answer(self, start: str, step: int) -> str:
        """The class ``step`` places after ``start`` (ValueError past the end of a non-cyclic task)."""
        k = self._index(start) + _check_step(step)
        if self.cyclic:
            return self.classes[k % self.K]
        if k >= self.K:
            raise ValueError(f"step: {start!r} + {step} is past the last class {self.classes[-1]!r} of "
                             f"{self.name!r}")
        return self.classes[k]

    def examples(self, steps: Sequence[int] = (1, 2, 3)) -> list[TaskExample]:
        """Every (start, step) prompt, start-major in class order; non-cyclic
        tasks skip the pairs whose answer would be past the last class."""
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or not steps:
            raise ValueError(f"steps: expected a non-empty sequence of ints ≥ 0, got {steps!r}")
        for step in steps:
            _check_step(step, "steps")
        out = []
        for k, start in enumerate(self.classes):
            for step in steps:
                if not self.cyclic and k + step >= self.K:
                    continue
                answer = self.answer(start, step)
                out.append(TaskExample(self.prompt(start, step), start, step, answer, self.classes.index(answer)))
        return out

    def answer_texts(self) -> list[str]:
        """" " + class for each class: what the model writes after "A:"."""
        return [" " + c for c in self.classes]

    def answer_prefix_ids(self, tokenizer) -> list[int]:
        """The token ids that every answer's encoding starts with (often none)."""
        encodings = [_encode(tokenizer, text, special=False) for text in self.answer_texts()]
        prefix = []
        for column in zip(*encodings):
            if len(set(column)) != 1:
                break
            prefix.append(column[0])
        return prefix

    def concept_tokens(self, tokenizer) -> list[int]:
        """The concept token of each class: its answer's first token after the answer prefix."""
        n_prefix = len(self.answer_prefix_ids(tokenizer))
        tokens = []
        for cls, text in zip(self.classes, self.answer_texts()):
            ids = _encode(tokenizer, text, special=False)
            if len(ids) <= n_prefix:
                raise ValueError(f"tokenizer: the answer {text!r} of class {cls!r} has no token after the prefix "
                                 f"shared by all answers ({n_prefix} tokens); its concept token is undefined")
            tokens.append(ids[n_prefix])
        return tokens

    def schema(self, tokenizer, vocab_size: int) -> ConceptSchema:
        """The ``ConceptSchema`` {class: [concept token]} over V = ``vocab_size``
        (ValueError when two classes share a concept token)."""
        return ConceptSchema(dict(zip(self.classes, ([t] for t in self.concept_tokens(tokenizer)))), vocab_size)

    def prompt_ids(self, tokenizer, prompt: str) -> list[int]:
        """tokenizer.encode(prompt) followed by the answer prefix."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
        return _encode(tokenizer, prompt, special=True) + self.answer_prefix_ids(tokenizer)

    def _index(self, start) -> int:
        if start not in self.classes:
            raise ValueError(f"start: expected one of the classes of {self.name!r} {list(self.classes)}, "
                             f"got {start!r}")
        return self.classes.index(start)


WEEKDAYS = ConceptTask("weekdays", ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
                       "Q: What day is {n} days after {x}?\nA:", cyclic=True)
MONTHS = ConceptTask("months", ("January", "February", "March", "April", "May", "June", "July", "August",
                                "September", "October", "November", "December"),
                     "Q: What month is {n} months after {x}?\nA:", cyclic=True)
LETTERS = ConceptTask("letters", tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)),
                      "Q: What letter is {n} letters after {x}?\nA:", cyclic=False)
AGES = ConceptTask("ages", tuple(str(a) for a in range(10, 100, 10)),
                   "Q: How old is someone {n} years after turning {x}?\nA:", cyclic=False, step_size=10)
TASKS = {task.name: task for task in (WEEKDAYS, MONTHS, LETTERS, AGES)}


def get_task(name: str) -> ConceptTask:
    """The built-in task ``name`` (one of ``TASKS``)."""
    if name not in TASKS:
        raise ValueError(f"name: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


def class_centroids(split, task: ConceptTask, tokenizer, examples: Sequence[TaskExample], *,
                    progress: bool = False) -> torch.Tensor:
    """(K, d): the mean hidden state at layer ``split.layer``, last position
    (after the answer prefix), of the examples whose answer is class k.

    Every class needs at least one example (for a non-cyclic task include
    step 0 to cover the first class). Cost: one ``split.context`` per example.
    """
    if not isinstance(split, SplitModel):
        raise TypeError(f"split: expected a SplitModel, got {type(split).__name__}")
    if not isinstance(task, ConceptTask):
        raise TypeError(f"task: expected a ConceptTask, got {type(task).__name__}")
    if not isinstance(examples, Sequence) or not examples or not all(isinstance(e, TaskExample) for e in examples):
        raise TypeError("examples: expected a non-empty sequence of TaskExample (from task.examples())")
    missing = sorted(set(task.classes) - {e.answer for e in examples}, key=task.classes.index)
    if missing:
        raise ValueError(f"examples: no example answers {missing}; every class needs one (non-cyclic tasks: "
                         "include step 0)")
    sums = torch.zeros(task.K, split.d, dtype=split.W.dtype, device=split.W.device)
    counts = torch.zeros(task.K, dtype=split.W.dtype, device=split.W.device)
    for example in tqdm(examples, desc=f"{task.name} centroids", disable=not progress, leave=False):
        ctx = split.context(task.prompt_ids(tokenizer, example.prompt))
        sums[example.answer_index] += ctx.h
        counts[example.answer_index] += 1
    return sums / counts[:, None]


def _check_step(step, name: str = "step") -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{name}: expected an int ≥ 0, got {step!r}")
    return step


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    """tokenizer.encode(text) as a list of ints; ``add_special_tokens=special`` where encode accepts it."""
    encode = getattr(tokenizer, "encode", None)
    if not callable(encode):
        raise TypeError(f"tokenizer: expected an object with an encode(text) method, got {type(tokenizer).__name__}")
    try:
        parameters = inspect.signature(encode).parameters
    except (TypeError, ValueError):
        parameters = {}
    accepts = "add_special_tokens" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                                        for p in parameters.values())
    ids = encode(text, add_special_tokens=special) if accepts else encode(text)
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    ids = list(ids)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"tokenizer: encode({text!r}) must return token ids (ints), got {ids!r}")
    return [int(i) for i in ids]
