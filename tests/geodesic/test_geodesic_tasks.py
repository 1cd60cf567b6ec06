"""Tests of fisherfast.geodesic.tasks with small fake tokenizers.

Oracles: the documented prompt strings written out; answers by modular /
plain arithmetic on the class index; concept tokens read off the fake
tokenizers' own vocabularies; class centroids as the per-class mean of
``split.context(ids).h`` on a tiny float64 Llama; ``check_task`` and
``steerable_layers`` against the model's own forward pass (with the centroid
written in by ``fisherfast.steer.steering``) and explicit token sums.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from fisherfast.geodesic import TASKS, ConceptTask, class_centroids, get_task
from fisherfast.geodesic.tasks import AGES, LETTERS, MONTHS, WEEKDAYS
from fisherfast.geodesic.taskcheck import check_task, near_chance, steerable_layers
from fisherfast.split import SplitModel
from fisherfast.steer import steering

V, D = 61, 32


class WordTokenizer:
    """Words with their leading space are one token; ids in order of first use."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r" ?\w+|\s|[^\w\s]", text)]
        return ([999] if add_special_tokens else []) + ids


class DigitTokenizer:
    """Splits digits and a leading space apart (like SmolLM2); encode(text) only."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r"[A-Za-z]+| |\d|.", text, re.S)]


class CharTokenizer:
    """One token per character: " Tuesday" and " Thursday" share " " then "T"."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_list_carrier_strings():
    assert WEEKDAYS.carrier == "list" and get_task("weekdays") == WEEKDAYS
    example = WEEKDAYS.list_example("Monday", 3)
    assert example.prompt == "Days of the week:\n1. Friday\n2. Saturday\n3. Sunday\n4."
    assert (example.start, example.step, example.answer, example.answer_index) == ("Sunday", 1, "Monday", 0)
    assert MONTHS.list_example("February", 4).prompt == \
        "Months of the year:\n1. October\n2. November\n3. December\n4. January\n5."
    # non-cyclic: the list shortens near the first class, down to the header alone
    assert LETTERS.list_example("A", 3).prompt == "Letters of the alphabet:\n1."
    assert LETTERS.list_example("A", 3).start is None
    assert LETTERS.list_example("C", 5).prompt == "Letters of the alphabet:\n1. A\n2. B\n3."
    assert AGES.list_example("40", 3).prompt == "Age groups:\n1. 10\n2. 20\n3. 30\n4."


def test_list_examples_cover_every_class_once_per_distinct_prompt():
    weekdays = WEEKDAYS.examples()
    assert len(weekdays) == 7 * 3
    for e in weekdays:
        assert e.answer_index == (WEEKDAYS.classes.index(e.start) + 1) % 7
        assert e.prompt.count("\n") in (4, 5, 6)
    letters = LETTERS.examples(lengths=(3, 4, 5))
    # A, B, C, D: one prompt each (lengths cut to 0..3); E: lengths 3, 4; F..Z: 3, 4, 5
    assert len(letters) == 4 + 2 + 21 * 3
    assert len({e.prompt for e in letters}) == len(letters)
    assert {e.answer for e in letters} == set(LETTERS.classes)
    assert [e.answer for e in AGES.examples(lengths=(1,))] == list(AGES.classes)
    with pytest.raises(ValueError, match="steps: the list carrier takes lengths"):
        WEEKDAYS.examples(steps=(1,))


def test_prompt_strings_and_answers():
    WEEKDAYS, MONTHS, LETTERS, AGES = (get_task(n, "arithmetic") for n in ("weekdays", "months", "letters", "ages"))
    assert WEEKDAYS.prompt("Monday", 2) == "Q: What day is 2 days after Monday?\nA:"
    assert WEEKDAYS.prompt("Sunday", 1) == "Q: What day is 1 day after Sunday?\nA:"
    assert MONTHS.prompt("March", 4) == "Q: What month is 4 months after March?\nA:"
    assert LETTERS.prompt("C", 3) == "Q: What letter is 3 letters after C?\nA:"
    assert AGES.prompt("20", 1) == "Q: How old is someone 10 years after turning 20?\nA:"
    assert WEEKDAYS.answer("Saturday", 3) == "Tuesday" and MONTHS.answer("November", 14) == "January"
    assert LETTERS.answer("C", 3) == "F" and AGES.answer("20", 2) == "40"
    assert WEEKDAYS.cyclic and MONTHS.cyclic and not LETTERS.cyclic and not AGES.cyclic
    assert (WEEKDAYS.n_classes, MONTHS.n_classes, LETTERS.n_classes, AGES.n_classes) == (7, 12, 26, 9)
    with pytest.warns(DeprecationWarning, match="n_classes"):
        assert WEEKDAYS.K == 7
    assert {name: task.with_carrier("arithmetic") for name, task in TASKS.items()} == {
        "weekdays": WEEKDAYS, "months": MONTHS, "letters": LETTERS, "ages": AGES}
    assert get_task("ages", "arithmetic") == AGES


def test_examples_cover_every_start_and_stop_at_the_end_of_ordinal_tasks():
    WEEKDAYS, LETTERS, AGES = (get_task(n, "arithmetic") for n in ("weekdays", "letters", "ages"))
    weekdays = WEEKDAYS.examples(steps=(1, 2, 3))
    assert len(weekdays) == 21
    first = weekdays[0]
    assert (first.prompt, first.start, first.step, first.answer, first.answer_index) == (
        "Q: What day is 1 day after Monday?\nA:", "Monday", 1, "Tuesday", 1)
    assert weekdays[-1].answer == "Wednesday"                 # Sunday + 3
    for e in weekdays:
        assert e.answer_index == (WEEKDAYS.classes.index(e.start) + e.step) % 7
    letters = LETTERS.examples(steps=(1, 2, 3))
    assert len(letters) == 25 + 24 + 23
    assert all(LETTERS.classes.index(e.start) + e.step == e.answer_index for e in letters)
    assert {e.answer for e in AGES.examples(steps=(0, 1))} == set(AGES.classes)


def test_schema_maps_each_class_to_its_first_answer_token():
    tokenizer = WordTokenizer()
    schema = WEEKDAYS.schema(tokenizer, vocab_size=1000)
    assert schema.concepts == {day: [tokenizer.vocab[" " + day]] for day in WEEKDAYS.classes}
    assert WEEKDAYS.answer_prefix_ids(tokenizer) == []
    assert schema.bins[-1] == "other" and schema.n_concepts == 7
    with pytest.warns(DeprecationWarning, match="n_concepts"):
        assert schema.K == 7
    # prompts keep the tokenizer's own special tokens
    assert WEEKDAYS.prompt_ids(tokenizer, "Q: x") == [999] + tokenizer.encode("Q: x", add_special_tokens=False)


def test_digit_splitting_tokenizers_get_an_answer_prefix():
    tokenizer = DigitTokenizer()
    prefix = AGES.answer_prefix_ids(tokenizer)
    assert prefix == [tokenizer.vocab[" "]]
    schema = AGES.schema(tokenizer, vocab_size=100)
    assert schema.concepts == {age: [tokenizer.vocab[age[0]]] for age in AGES.classes}
    prompt = AGES.list_example("30", 2).prompt
    ids = AGES.prompt_ids(tokenizer, prompt)
    assert ids[-1] == tokenizer.vocab[" "] and ids[:-1] == tokenizer.encode(prompt)


def test_classes_sharing_a_concept_token_are_an_error():
    with pytest.raises(ValueError, match="concepts: expected disjoint concepts, got token [0-9]+ in 'Tuesday' and 'Thursday'"):
        WEEKDAYS.schema(CharTokenizer(), vocab_size=200)
    task = ConceptTask("nested", ("1", "10"), cyclic=False, header="Numbers:")
    with pytest.raises(ValueError, match="class '1' has no token after the prefix"):
        task.schema(DigitTokenizer(), vocab_size=100)


def test_class_centroids_average_the_states_of_each_answer(tiny_lm):
    split = SplitModel(tiny_lm("llama", vocab=V, d=D, layers=2), layer=1)
    tokenizer = DigitTokenizer()
    task = ConceptTask("small", ("10", "20", "30"), cyclic=False, template="Q: {x} plus {n}?\nA:", step_size=10,
                       carrier="arithmetic")
    examples = task.examples(steps=(0, 1))
    C = class_centroids(split, task, tokenizer, examples)
    assert max(max(task.prompt_ids(tokenizer, e.prompt)) for e in examples) < V
    for k, cls in enumerate(task.classes):
        states = [split.context(tokenizer.encode(e.prompt) + [tokenizer.vocab[" "]]).h
                  for e in examples if e.answer == cls]
        torch.testing.assert_close(C[k], torch.stack(states).mean(0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"no example answers \['10'\]"):
        class_centroids(split, task, tokenizer, task.examples(steps=(1,)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="start: expected one of the classes"):
        WEEKDAYS.prompt("Funday", 1)
    with pytest.raises(ValueError, match="items: expected one of the classes"):
        WEEKDAYS.list_prompt(["Monday", "Funday"])
    with pytest.raises(ValueError, match="carrier: expected one of"):
        WEEKDAYS.with_carrier("chat")
    with pytest.raises(ValueError, match="header: the list carrier of 'x' needs a header"):
        ConceptTask("x", ("a", "b"), cyclic=True, template="{x}{n}")
    with pytest.raises(ValueError, match="lengths: the arithmetic carrier takes steps"):
        get_task("weekdays", "arithmetic").examples(lengths=(3,))
    with pytest.raises(ValueError, match="step: expected an int ≥ 0"):
        WEEKDAYS.answer("Monday", -1)
    with pytest.raises(ValueError, match="step: expected an int ≥ 0"):
        WEEKDAYS.prompt("Monday", 1.5)
    with pytest.raises(TypeError, match="split: expected a SplitModel"):
        class_centroids(None, WEEKDAYS, WordTokenizer(), WEEKDAYS.examples())
    with pytest.raises(ValueError, match="past the last class"):
        LETTERS.answer("Y", 2)
    with pytest.raises(ValueError, match="steps"):
        WEEKDAYS.with_carrier("arithmetic").examples(steps=())
    with pytest.raises(ValueError, match="steps"):
        WEEKDAYS.with_carrier("arithmetic").examples(steps=(1.5,))
    with pytest.raises(ValueError, match="lengths"):
        WEEKDAYS.examples(lengths=(-1,))
    with pytest.raises(ValueError, match="name: expected one of"):
        get_task("colours")
    with pytest.raises(TypeError, match="tokenizer: expected an object with an encode"):
        WEEKDAYS.schema(object(), vocab_size=100)
    with pytest.raises(TypeError, match="prompt: expected a str"):
        WEEKDAYS.prompt_ids(WordTokenizer(), 3)
    with pytest.raises(ValueError, match="classes"):
        ConceptTask("one", ("a",), cyclic=True, header="h")
    with pytest.raises(ValueError, match="template"):
        ConceptTask("bad", ("a", "b"), cyclic=True, template="{x}", carrier="arithmetic")
    with pytest.raises(ValueError, match=r"expected token ids in \[0, "):
        WEEKDAYS.schema(WordTokenizer(), vocab_size=3)


def model_q(model, ids, token_of_class):
    """Concept distribution (K,) from the model's own forward pass, and its top token."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    p = torch.softmax(logits, -1)
    return p[token_of_class], int(logits.argmax())


def test_check_task_against_the_models_forward(tiny_lm):
    model = tiny_lm("llama", vocab=V, d=D, layers=2, head_scale=10.0)
    tokenizer = DigitTokenizer()
    tokens = WEEKDAYS.concept_tokens(tokenizer)
    examples = WEEKDAYS.examples()
    correct = top1 = mass = 0.0
    for e in examples:
        q, top = model_q(model, WEEKDAYS.prompt_ids(tokenizer, e.prompt), tokens)
        correct += int(q.argmax()) == e.answer_index
        top1 += top == tokens[e.answer_index]
        mass += float(q.sum())
    n = len(examples)
    expect_near = near_chance(correct / n, 7, n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = check_task(SplitModel(model, 1), WEEKDAYS, tokenizer)
    assert any("near chance" in str(w.message) for w in caught) == expect_near
    assert (result.n, result.task, result.carrier, result.chance) == (n, "weekdays", "list", 1 / 7)
    assert result.accuracy == correct / n and result.top1 == top1 / n
    assert result.concept_mass == pytest.approx(mass / n, rel=1e-12)
    assert result.near_chance == expect_near


def test_near_chance_is_two_binomial_deviations():
    # K = 4, n = 100: chance 0.25, two deviations 2·√(0.25·0.75/100) = 0.0866
    assert near_chance(0.33, 4, 100) and not near_chance(0.34, 4, 100)


def test_steerable_layers_inject_centroids_as_the_models_forward_does(tiny_lm):
    model = tiny_lm("llama", vocab=V, d=D, layers=3, head_scale=10.0)
    tokenizer = DigitTokenizer()
    tokens = WEEKDAYS.concept_tokens(tokenizer)
    examples = WEEKDAYS.examples(lengths=(2, 3))
    controls = steerable_layers(model, WEEKDAYS, tokenizer, [1, 2], examples, threshold=0.5)
    for layer, control in zip([1, 2], controls):
        C = class_centroids(SplitModel(model, layer), WEEKDAYS, tokenizer, examples)
        hits, mass = 0, 0.0
        for e in examples:
            for k in range(7):
                with steering(model, {layer: C[k]}, mode="replace"):
                    q, _ = model_q(model, WEEKDAYS.prompt_ids(tokenizer, e.prompt), tokens)
                hits += int(q.argmax()) == k
                mass += float(q[k])
        assert control.layer == layer
        assert control.accuracy == hits / (7 * len(examples))
        assert control.target_mass == pytest.approx(mass / (7 * len(examples)), rel=1e-9)
        assert control.steerable == (control.accuracy >= 0.5)
    with pytest.raises(ValueError, match="layers: expected a non-empty sequence"):
        steerable_layers(model, WEEKDAYS, tokenizer, [])
    with pytest.raises(ValueError, match=r"no example answers \['Monday'\]"):
        steerable_layers(model, WEEKDAYS, tokenizer, [1], [e for e in examples if e.answer != "Monday"])
    # review: a bad later layer was found only after the earlier layers' work
    with pytest.raises(ValueError, match="layers: expected an int ≥ 0 and ≤ 3, got 9"):
        steerable_layers(model, WEEKDAYS, tokenizer, [1, 9], examples)
    with pytest.raises(ValueError, match="layers: expected an int ≥ 0 and ≤ 3, got '2'"):
        steerable_layers(model, WEEKDAYS, tokenizer, [1, "2"], examples)



def test_concept_task_rejects_malformed_definitions():
    """Review: cyclic="no" was taken as True, a str of classes as its characters,
    int classes were accepted, and a template with an unknown field failed only
    later with KeyError when prompts were made."""
    from fisherfast.geodesic import ConceptTask

    with pytest.raises(TypeError, match="cyclic: expected a bool"):
        ConceptTask("t", ("a", "b", "c"), cyclic="no", header="H:")
    for classes in ("abc", (1, 2, 3), ("a", "")):
        with pytest.raises(ValueError, match="classes: expected a tuple of non-empty class strings"):
            ConceptTask("t", classes, cyclic=False, header="H:")
    with pytest.raises(ValueError, match=r"template: expected only the fields .* got \['n', 'x', 'y'\]"):
        ConceptTask("t", ("a", "b", "c"), cyclic=True, template="{x} plus {n} {y}", carrier="arithmetic")
    with pytest.raises(ValueError, match="template: expected a str"):
        ConceptTask("t", ("a", "b", "c"), cyclic=True, template=3, carrier="arithmetic")
    task = ConceptTask("t", ["a", "b", "c"], cyclic=True, template="{n} after {x}:", carrier="arithmetic")
    assert task.classes == ("a", "b", "c")
    assert task.prompt("b", 2) == "2 after b:"
