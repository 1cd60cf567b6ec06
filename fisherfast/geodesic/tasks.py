"""Built-in ordinal concept tasks for geodesic steering (docs/design.md §6).

A task is K ordered classes (weekdays, months, letters, ages) and two ways of
asking for one of them, its *carriers*:

- ``carrier="list"`` (the default): a successor list. A header and a
  numbered list of the items before the answer, ending at the next number:

      "Days of the week:\\n1. Friday\\n2. Saturday\\n3. Sunday\\n4."  → " Monday"

  The answer is the class after the last listed item (``step`` = 1,
  ``start`` = the last listed item). Non-cyclic tasks list fewer items near
  the start of the classes (the header alone, "Letters:\\n1.", asks for "A").
  Small models carry these: on SmolLM2-135M-Instruct weekdays 100% accuracy
  (0.99 concept mass), months 100% (0.97), letters 96% (0.96), ages 89%
  (1.00) over list lengths 3–5.
- ``carrier="arithmetic"``: zero-shot n-step arithmetic from ``template``
  with fields {n}, {x} and optionally {unit} (singular for n = 1):
  "Q: What day is 3 days after Friday?\\nA:". The answer is the class
  (index(x) + step) mod K (cyclic) or index(x) + step (pairs past the last
  class are not generated); n = step · ``step_size``. SmolLM2-135M and
  Gemma-3-270M answer these at chance (``check_task`` says so).

Concept schema (for a given tokenizer): the answer text of class k is " " +
class. Its concept token is the first token of tokenizer.encode(" " +
class): " Monday" for weekdays. Where every answer's encoding starts with the
same tokens (a digit-splitting tokenizer encodes " 30" as " ", "3", "0"),
that common prefix is the *answer prefix*: it is appended to each prompt's
ids (``prompt_ids``) so the model's next token is the first distinguishing
one, which is then the concept token ("3" for " 30": the ages concept is the
first digit). Concept token sets must be disjoint (the schema rules of
``fisherfast.metric``); a tokenizer under which two classes share their
concept token is an error. Tokenizers are used only through ``encode``
(with ``add_special_tokens=False`` for answers when its signature accepts
it; prompts are encoded with the tokenizer's defaults).
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
import string
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fisherfast.checks import check_int
from fisherfast.concepts import ConceptSchema
from fisherfast.split import SplitModel

__all__ = ["ConceptTask", "TaskExample", "WEEKDAYS", "MONTHS", "LETTERS", "AGES", "TASKS", "CARRIERS",
           "get_task", "class_centroids"]

CARRIERS = ("list", "arithmetic")


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One prompt asking for the class ``step`` places after ``start``.

    ``start`` is None for a list carrier that lists no item (the header alone
    asks for the first class of a non-cyclic task)."""

    prompt: str
    start: str | None
    step: int
    answer: str
    answer_index: int


@dataclasses.dataclass(frozen=True)
class ConceptTask:
    """An ordinal concept task and its carriers (module docstring).

    Attributes:
        name: the task's name.
        classes: the K class strings in order.
        cyclic: whether the classes wrap around (periodic spline, modular answers).
        header: the list carrier's first line ("Days of the week:"); None if
            the task has no list carrier.
        template: the arithmetic carrier, with fields {n} and {x} (and
            optionally {unit}); None if the task has no arithmetic carrier.
        unit: (singular, plural) for {unit} (singular when n = 1).
        step_size: the arithmetic prompt shows n = step · step_size.
        carrier: "list" or "arithmetic": what ``examples`` generates.

    ``with_carrier("arithmetic")`` gives the same task with the other carrier.
    Raises ValueError for fewer than 2 or repeated classes, an unknown
    carrier, or a carrier whose text (header / template with {n} and {x}) is
    missing.
    """

    name: str
    classes: tuple[str, ...]
    cyclic: bool
    header: str | None = None
    template: str | None = None
    unit: tuple[str, str] = ("", "")
    step_size: int = 1
    carrier: str = "list"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty str, got {self.name!r}")
        if isinstance(self.classes, (str, bytes)) or not isinstance(self.classes, (tuple, list)) or \
                not all(isinstance(c, str) and c for c in self.classes):
            raise ValueError(f"classes: expected a tuple of non-empty class strings, got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if not isinstance(self.cyclic, bool):
            raise TypeError(f"cyclic: expected a bool, got {type(self.cyclic).__name__}")
        if self.template is not None:
            if not isinstance(self.template, str):
                raise ValueError(f"template: expected a str or None, got {type(self.template).__name__}")
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
            except ValueError as err:
                raise ValueError(f"template: not a format string ({err}): {self.template!r}") from None
            if not fields <= {"n", "x", "unit"}:
                raise ValueError(f"template: expected only the fields {{n}}, {{x}} and {{unit}}, got "
                                 f"{sorted(fields)} in {self.template!r}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes: expected at least 2 distinct classes, got {self.classes!r}")
        if self.carrier not in CARRIERS:
            raise ValueError(f"carrier: expected one of {CARRIERS}, got {self.carrier!r}")
        if self.header is not None and (not isinstance(self.header, str) or not self.header.strip()):
            raise ValueError(f"header: expected a non-empty str or None, got {self.header!r}")
        if self.template is not None and ("{n}" not in self.template or "{x}" not in self.template):
            raise ValueError(f"template: expected the fields {{n}} and {{x}}, got {self.template!r}")
        if self.carrier == "list" and self.header is None:
            raise ValueError(f"header: the list carrier of {self.name!r} needs a header")
        if self.carrier == "arithmetic" and self.template is None:
            raise ValueError(f"template: the arithmetic carrier of {self.name!r} needs a template")
        if len(self.unit) != 2 or not all(isinstance(u, str) for u in self.unit):
            raise ValueError(f"unit: expected (singular, plural) strings, got {self.unit!r}")
        check_int("step_size", self.step_size, minimum=1)

    @property
    def n_classes(self) -> int:
        """The number of classes (the concepts of ``schema``)."""
        return len(self.classes)

    @property
    def K(self) -> int:
        """Deprecated name of ``n_classes`` (K is the vocabulary size in ``SketchSpec``)."""
        import warnings

        warnings.warn("ConceptTask.K is deprecated; use ConceptTask.n_classes", DeprecationWarning, stacklevel=2)
        return self.n_classes

    def with_carrier(self, carrier: str) -> "ConceptTask":
        """The same task generating ``carrier`` prompts ("list" or "arithmetic")."""
        return dataclasses.replace(self, carrier=carrier)

    # ------------------------------------------------------------------ arithmetic carrier

    def prompt(self, start: str, step: int) -> str:
        """The arithmetic prompt: the template with x = ``start``, n = step · step_size."""
        if self.template is None:
            raise ValueError(f"template: {self.name!r} has no arithmetic carrier")
        self._index(start)
        n = _check_step(step) * self.step_size
        return self.template.format(n=n, x=start, unit=self.unit[0] if n == 1 else self.unit[1])

    def answer(self, start: str, step: int) -> str:
        """The class ``step`` places after ``start`` (ValueError past the end of a non-cyclic task)."""
        k = self._index(start) + _check_step(step)
        if self.cyclic:
            return self.classes[k % self.n_classes]
        if k >= self.n_classes:
            raise ValueError(f"step: {start!r} + {step} is past the last class {self.classes[-1]!r} of "
                             f"{self.name!r}")
        return self.classes[k]

    # ------------------------------------------------------------------ list carrier

    def list_prompt(self, items: Sequence[str]) -> str:
        """The list carrier showing ``items`` (classes, possibly none), numbered from 1:
        header, one "i. item" line each, then the next number and "."."""
        if self.header is None:
            raise ValueError(f"header: {self.name!r} has no list carrier")
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise TypeError(f"items: expected a sequence of classes, got {type(items).__name__}")
        for item in items:
            self._index(item, "items")
        lines = [self.header] + [f"{i}. {item}" for i, item in enumerate(items, 1)]
        return "\n".join(lines) + f"\n{len(items) + 1}."

    def list_example(self, answer: str, length: int) -> TaskExample:
        """The list carrier asking for ``answer`` after the ``length`` classes before it
        (non-cyclic tasks: at most as many as there are before it)."""
        k = self._index(answer, "answer")
        length = _check_step(length, "length")
        if not self.cyclic:
            length = min(length, k)
        items = [self.classes[(k - length + i) % self.n_classes] for i in range(length)]
        return TaskExample(self.list_prompt(items), items[-1] if items else None, 1, answer, k)

    # ------------------------------------------------------------------ both

    def examples(self, steps: Sequence[int] | None = None, lengths: Sequence[int] | None = None
                 ) -> list[TaskExample]:
        """The carrier prompts, in class order.

        List carrier: one example per answer class and list length in
        ``lengths`` (default (3, 4, 5)), each distinct prompt once (near the
        start of a non-cyclic task the lists shorten and coincide); ``steps``
        must be None.
        Arithmetic carrier: every (start, step) pair, start-major, for
        ``steps`` (default (1, 2, 3)), skipping answers past the last class of
        a non-cyclic task; ``lengths`` must be None.
        """
        if self.carrier == "list":
            if steps is not None:
                raise ValueError("steps: the list carrier takes lengths, not steps (or use "
                                 "with_carrier('arithmetic'))")
            lengths = _check_ints((3, 4, 5) if lengths is None else lengths, "lengths")
            out = {}
            for answer in self.classes:
                for length in lengths:
                    example = self.list_example(answer, length)
                    out.setdefault(example.prompt, example)     # shortened lists of a non-cyclic task repeat
            return list(out.values())
        if lengths is not None:
            raise ValueError("lengths: the arithmetic carrier takes steps, not lengths")
        steps = _check_ints((1, 2, 3) if steps is None else steps, "steps")
        out = []
        for k, start in enumerate(self.classes):
            for step in steps:
                if not self.cyclic and k + step >= self.n_classes:
                    continue
                answer = self.answer(start, step)
                out.append(TaskExample(self.prompt(start, step), start, step, answer, self.classes.index(answer)))
        return out

    def answer_texts(self) -> list[str]:
        """" " + class for each class: what the model writes next."""
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

    def _index(self, cls, name: str = "start") -> int:
        if cls not in self.classes:
            raise ValueError(f"{name}: expected one of the classes of {self.name!r} {list(self.classes)}, "
                             f"got {cls!r}")
        return self.classes.index(cls)


WEEKDAYS = ConceptTask("weekdays", ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
                       cyclic=True, header="Days of the week:",
                       template="Q: What day is {n} {unit} after {x}?\nA:", unit=("day", "days"))
MONTHS = ConceptTask("months", ("January", "February", "March", "April", "May", "June", "July", "August",
                                "September", "October", "November", "December"),
                     cyclic=True, header="Months of the year:",
                     template="Q: What month is {n} {unit} after {x}?\nA:", unit=("month", "months"))
LETTERS = ConceptTask("letters", tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)), cyclic=False,
                      header="Letters of the alphabet:",
                      template="Q: What letter is {n} {unit} after {x}?\nA:", unit=("letter", "letters"))
AGES = ConceptTask("ages", tuple(str(a) for a in range(10, 100, 10)), cyclic=False, header="Age groups:",
                   template="Q: How old is someone {n} {unit} after turning {x}?\nA:", unit=("year", "years"),
                   step_size=10)
TASKS = {task.name: task for task in (WEEKDAYS, MONTHS, LETTERS, AGES)}


def get_task(name: str, carrier: str = "list") -> ConceptTask:
    """The built-in task ``name`` (one of ``TASKS``) with ``carrier`` ("list" or "arithmetic")."""
    if name not in TASKS:
        raise ValueError(f"name: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name].with_carrier(carrier)


def class_centroids(split, task: ConceptTask, tokenizer, examples: Sequence[TaskExample], *,
                    progress: bool = False) -> torch.Tensor:
    """(K, d): the mean hidden state at layer ``split.layer``, last position
    (after the answer prefix), of the examples whose answer is class k.

    Every class needs at least one example (arithmetic carriers of a
    non-cyclic task: include step 0 to cover the first class). Cost: one
    ``split.context`` per example.
    """
    if not isinstance(split, SplitModel):
        raise TypeError(f"split: expected a SplitModel, got {type(split).__name__}")
    if not isinstance(task, ConceptTask):
        raise TypeError(f"task: expected a ConceptTask, got {type(task).__name__}")
    check_examples(examples)
    missing = sorted(set(task.classes) - {e.answer for e in examples}, key=task.classes.index)
    if missing:
        raise ValueError(f"examples: no example answers {missing}; every class needs one (non-cyclic tasks: "
                         "include step 0)")
    sums = torch.zeros(task.n_classes, split.d, dtype=split.W.dtype, device=split.W.device)
    counts = torch.zeros(task.n_classes, dtype=split.W.dtype, device=split.W.device)
    for example in tqdm(examples, desc=f"{task.name} centroids", disable=not progress, leave=False):
        ctx = split.context(task.prompt_ids(tokenizer, example.prompt))
        sums[example.answer_index] += ctx.h
        counts[example.answer_index] += 1
    return sums / counts[:, None]


def check_examples(examples) -> list[TaskExample]:
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) or not examples or \
            not all(isinstance(e, TaskExample) for e in examples):
        raise TypeError("examples: expected a non-empty sequence of TaskExample (from task.examples())")
    return list(examples)


def _check_step(step, name: str = "step") -> int:
    return check_int(name, step, minimum=0)


def _check_ints(values, name: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name}: expected a non-empty sequence of ints ≥ 0, got {values!r}")
    return tuple(_check_step(v, name) for v in values)


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
        raise TypeError(f"tokenizer: expected encode({text!r}) to return token ids (ints), got {ids!r}")
    return [int(i) for i in ids]
