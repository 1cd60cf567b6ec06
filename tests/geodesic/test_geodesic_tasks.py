"""Tests of fisherfast.geodesic.tasks with small fake tokenizers.

Oracles: the documented prompt strings written out; answers by modular /
plain arithmetic on the class index; concept tokens read off the fake
tokenizers' own vocabularies; class centroids as the per-class mean of
``split.context(ids).h`` on a tiny float64 Llama.
"""
from __future__ import annotations

import re

import pytest
import torch
import transformers

from fisherfast.geodesic import AGES, LETTERS, MONTHS, TASKS, WEEKDAYS, ConceptTask, class_centroids, get_task
from fisherfast.split import SplitModel

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


def test_prompt_strings_and_answers():
    assert WEEKDAYS.prompt("Monday", 2) == "Q: What day is 2 days after Monday?\nA:"
    assert MONTHS.prompt("March", 4) == "Q: What month is 4 months after March?\nA:"
    assert LETTERS.prompt("C", 3) == "Q: What letter is 3 letters after C?\nA:"
    assert AGES.prompt("20", 1) == "Q: How old is someone 10 years after turning 20?\nA:"
    assert WEEKDAYS.answer("Saturday", 3) == "Tuesday" and MONTHS.answer("November", 14) == "January"
    assert LETTERS.answer("C", 3) == "F" and AGES.answer("20", 2) == "40"
    assert WEEKDAYS.cyclic and MONTHS.cyclic and not LETTERS.cyclic and not AGES.cyclic
    assert (WEEKDAYS.K, MONTHS.K, LETTERS.K, AGES.K) == (7, 12, 26, 9)
    assert TASKS == {"weekdays": WEEKDAYS, "months": MONTHS, "letters": LETTERS, "ages": AGES}
    assert get_task("ages") is AGES


def test_examples_cover_every_start_and_stop_at_the_end_of_ordinal_tasks():
    weekdays = WEEKDAYS.examples(steps=(1, 2, 3))
    assert len(weekdays) == 21
    first = weekdays[0]
    assert (first.prompt, first.start, first.step, first.answer, first.answer_index) == (
        "Q: What day is 1 days after Monday?\nA:", "Monday", 1, "Tuesday", 1)
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
    assert schema.bins[-1] == "other" and schema.K == 7
    # prompts keep the tokenizer's own special tokens
    assert WEEKDAYS.prompt_ids(tokenizer, "Q: x") == [999] + tokenizer.encode("Q: x", add_special_tokens=False)


def test_digit_splitting_tokenizers_get_an_answer_prefix():
    tokenizer = DigitTokenizer()
    prefix = AGES.answer_prefix_ids(tokenizer)
    assert prefix == [tokenizer.vocab[" "]]
    schema = AGES.schema(tokenizer, vocab_size=100)
    assert schema.concepts == {age: [tokenizer.vocab[age[0]]] for age in AGES.classes}
    ids = AGES.prompt_ids(tokenizer, AGES.prompt("20", 1))
    assert ids[-1] == tokenizer.vocab[" "] and ids[:-1] == tokenizer.encode(AGES.prompt("20", 1))


def test_classes_sharing_a_concept_token_are_an_error():
    with pytest.raises(ValueError, match="in concepts 'Tuesday' and 'Thursday'; concepts must be disjoint"):
        WEEKDAYS.schema(CharTokenizer(), vocab_size=200)
    task = ConceptTask("nested", ("1", "10"), "{x} {n}", cyclic=False)
    with pytest.raises(ValueError, match="class '1' has no token after the prefix"):
        task.schema(DigitTokenizer(), vocab_size=100)


def tiny_llama(seed: int = 0):
    """A random-init float64 Llama (as tests/test_metric.py::tiny_model)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * D,
        num_key_value_heads=2, max_position_embeddings=64))
    model.config._attn_implementation = "eager"
    return model.double().eval().requires_grad_(False)


def test_class_centroids_average_the_states_of_each_answer():
    split = SplitModel(tiny_llama(), layer=1)
    tokenizer = DigitTokenizer()
    task = ConceptTask("small", ("10", "20", "30"), "Q: {x} plus {n}?\nA:", cyclic=False, step_size=10)
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
    with pytest.raises(ValueError, match="step: expected an int ≥ 0"):
        WEEKDAYS.answer("Monday", -1)
    with pytest.raises(ValueError, match="step: expected an int ≥ 0"):
        WEEKDAYS.prompt("Monday", 1.5)
    with pytest.raises(TypeError, match="split: expected a SplitModel"):
        class_centroids(None, WEEKDAYS, WordTokenizer(), WEEKDAYS.examples())
    with pytest.raises(ValueError, match="past the last class"):
        LETTERS.answer("Y", 2)
    with pytest.raises(ValueError, match="steps"):
        WEEKDAYS.examples(steps=())
    with pytest.raises(ValueError, match="steps"):
        WEEKDAYS.examples(steps=(1.5,))
    with pytest.raises(ValueError, match="name: expected one of"):
        get_task("colours")
    with pytest.raises(TypeError, match="tokenizer: expected an object with an encode"):
        WEEKDAYS.schema(object(), vocab_size=100)
    with pytest.raises(TypeError, match="prompt: expected a str"):
        WEEKDAYS.prompt_ids(WordTokenizer(), 3)
    with pytest.raises(ValueError, match="classes"):
        ConceptTask("one", ("a",), "{x}{n}", cyclic=True)
    with pytest.raises(ValueError, match="template"):
        ConceptTask("bad", ("a", "b"), "{x}", cyclic=True)
    with pytest.raises(ValueError, match="token ids must be ints in"):
        WEEKDAYS.schema(WordTokenizer(), vocab_size=3)
