"""Steering benchmark data (docs/design.md §5): verb-morphology concepts for the
FishBack comparison (bench_fishback.py) and two-sided behaviours for the
INNSteer evaluation (bench_innsteer.py), written for this project. Benchmark
data, not library: it lives beside the benches (formerly
``fisherfast.steer.benchmarks``).

A ``MorphologyConcept`` is one inflection of English verbs — past (" walked"),
3rd-person present (" walks") or progressive (" walking") — given as the
space-prefixed word forms whose next-token probability is the concept
(target T), the other two inflections of the same verbs (source S, for a
log-odds concept and for "off-target" = outside T ∪ S), 12 carrier prompts
that do not already favour the form, and 12 contrastive context pairs
(h⁺ from a context that calls for the form, h⁻ from one that calls for
another) for the direction baselines (CAA, ActAdd, probe, INNSteer).

A ``Behaviour`` is a binary choice of the next token — T against S — with
12 contrastive training pairs and held-out prompts on which steering is
measured.

Word lists are strings; ``single_token_ids`` keeps the words that a given
tokenizer encodes as exactly one token (the concept is a next-token set), so
how many survive depends on the tokenizer and is reported by the benches.
"""
from __future__ import annotations

import dataclasses

from fisherfast.concepts import ConceptScore

# (past, 3rd person, progressive) of verbs whose three forms differ from one another
# and from other verbs' forms (no "read"/"put"/"cut"-type collisions).
VERB_FORMS: tuple[tuple[str, str, str], ...] = (
    ("walked", "walks", "walking"), ("talked", "talks", "talking"), ("jumped", "jumps", "jumping"),
    ("played", "plays", "playing"), ("worked", "works", "working"), ("called", "calls", "calling"),
    ("looked", "looks", "looking"), ("moved", "moves", "moving"), ("lived", "lives", "living"),
    ("helped", "helps", "helping"), ("started", "starts", "starting"), ("turned", "turns", "turning"),
    ("opened", "opens", "opening"), ("closed", "closes", "closing"), ("stopped", "stops", "stopping"),
    ("asked", "asks", "asking"), ("wanted", "wants", "wanting"), ("watched", "watches", "watching"),
    ("waited", "waits", "waiting"), ("tried", "tries", "trying"), ("cried", "cries", "crying"),
    ("smiled", "smiles", "smiling"), ("laughed", "laughs", "laughing"), ("ran", "runs", "running"),
    ("sat", "sits", "sitting"), ("ate", "eats", "eating"), ("drank", "drinks", "drinking"),
    ("slept", "sleeps", "sleeping"), ("sang", "sings", "singing"), ("wrote", "writes", "writing"),
    ("went", "goes", "going"), ("came", "comes", "coming"), ("swam", "swims", "swimming"),
    ("climbed", "climbs", "climbing"), ("danced", "dances", "dancing"), ("cooked", "cooks", "cooking"),
    ("cleaned", "cleans", "cleaning"), ("pushed", "pushes", "pushing"), ("fell", "falls", "falling"),
    ("left", "leaves", "leaving"), ("stayed", "stays", "staying"), ("learned", "learns", "learning"),
)

# (subject, pronoun) and (past, 3rd person, progressive) activities: "Yesterday the boy cooked dinner and
# then he …" calls for a past verb, "Every day the boy cooks dinner and then he …" for a 3rd-person one.
_SUBJECTS = (("the boy", "he"), ("the girl", "she"), ("the old man", "he"), ("my sister", "she"),
             ("the teacher", "she"), ("the farmer", "he"), ("the young woman", "she"), ("his father", "he"),
             ("the doctor", "she"), ("our neighbour", "he"), ("the child", "she"), ("my uncle", "he"))
_ACTIVITIES = (
    ("cooked dinner", "cooks dinner", "cooking dinner"), ("washed the car", "washes the car", "washing the car"),
    ("fed the cat", "feeds the cat", "feeding the cat"),
    ("opened the window", "opens the window", "opening the window"),
    ("cleaned the kitchen", "cleans the kitchen", "cleaning the kitchen"),
    ("drank some tea", "drinks some tea", "drinking some tea"), ("packed a bag", "packs a bag", "packing a bag"),
    ("called home", "calls home", "calling home"), ("watered the plants", "waters the plants", "watering the plants"),
    ("locked the door", "locks the door", "locking the door"), ("made coffee", "makes coffee", "making coffee"),
    ("wrote a letter", "writes a letter", "writing a letter"),
)


@dataclasses.dataclass(frozen=True)
class MorphologyConcept:
    """One verb inflection as a next-token concept.

    Attributes:
        name: "past", "third_person" or "progressive".
        words: target forms T (space-prefixed, e.g. " walked").
        source_words: the other two inflections of the same verbs (S).
        carriers: 12 prompts to steer (the form is not their most likely continuation).
        pairs: 12 (positive, negative) contexts: the positive calls for the form.
    """

    name: str
    words: tuple[str, ...]
    source_words: tuple[str, ...]
    carriers: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]


def _forms(index: int) -> tuple[str, ...]:
    return tuple(" " + verbs[index] for verbs in VERB_FORMS)


def _others(index: int) -> tuple[str, ...]:
    return tuple(" " + verbs[j] for verbs in VERB_FORMS for j in range(3) if j != index)


_HABITUAL = ("Every morning", "Each day", "Most evenings", "On weekends", "Usually", "Every summer", "Often",
             "Each night", "Sometimes", "Every Sunday", "In the mornings", "Now and then")
_PAST = ("Yesterday", "Last night", "Two days ago", "Last summer", "Long ago", "Last week", "Earlier today",
         "The night before", "Once upon a time", "Last Sunday", "In 1990", "A moment ago")


def _clauses(kind: str, shift: int = 0) -> tuple[str, ...]:
    """12 contexts of one kind ("past", "third_person", "progressive"); ``shift`` rotates the
    activities and time phrases so carriers do not repeat the training pairs."""
    out = []
    for i, (who, pronoun) in enumerate(_SUBJECTS):
        j = (i + shift) % 12
        past, third, progressive = _ACTIVITIES[j]
        if kind == "past":
            out.append(f"{_PAST[j]} {who} {past} and then {pronoun}")
        elif kind == "third_person":
            out.append(f"{_HABITUAL[j]} {who} {third} and then {pronoun}")
        else:
            out.append(f"Right now {who} is {progressive} and {pronoun} is also")
    return tuple(out)


MORPHOLOGY_CONCEPTS: dict[str, MorphologyConcept] = {
    "past": MorphologyConcept(  # carriers call for the 3rd person
        name="past", words=_forms(0), source_words=_others(0), carriers=_clauses("third_person", 5),
        pairs=tuple(zip(_clauses("past"), _clauses("third_person")))),
    "third_person": MorphologyConcept(  # carriers call for the past
        name="third_person", words=_forms(1), source_words=_others(1), carriers=_clauses("past", 5),
        pairs=tuple(zip(_clauses("third_person"), _clauses("past")))),
    "progressive": MorphologyConcept(  # carriers call for the past or the 3rd person
        name="progressive", words=_forms(2), source_words=_others(2),
        carriers=tuple(p if i % 2 else t for i, (p, t) in enumerate(zip(_clauses("past", 5),
                                                                          _clauses("third_person", 5)))),
        pairs=tuple(zip(_clauses("progressive"), _clauses("third_person")))),
}


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """A binary next-token behaviour: T (steer towards) against S (away from).

    Attributes:
        name: short label.
        words, source_words: T and S (single words, space-prefixed unless they open a line).
        pairs: 12 (positive, negative) training contexts (positive calls for T).
        held_out: prompts not used for fitting, on which steering is measured.
    """

    name: str
    words: tuple[str, ...]
    source_words: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    held_out: tuple[str, ...]


_THINGS = ("movie", "meal", "concert", "hotel", "book", "game", "trip", "show", "class", "party", "album", "play")
_LATER = ("museum", "lecture", "restaurant", "flight", "song", "festival", "hike", "phone", "course", "film")

BEHAVIOURS: dict[str, Behaviour] = {
    "sentiment": Behaviour(  # towards the negative: the held-out prompts lean positive
        name="sentiment",
        words=(" bad", " terrible", " awful", " horrible", " poor", " boring", " disappointing", " dull"),
        source_words=(" good", " great", " wonderful", " excellent", " amazing", " fantastic", " lovely", " brilliant"),
        pairs=tuple((f"I hated the {t}, it was", f"I loved the {t}, it was") for t in _THINGS),
        held_out=tuple(f"Honestly, the {t} was" for t in _LATER)),
    "compliance": Behaviour(
        name="compliance",
        words=(" Yes", " Sure", " Certainly", " Absolutely", " Of"),
        source_words=(" No", " Sorry", " Unfortunately", " Never", " I"),
        pairs=tuple((f"Q: {q} A (glad to help):", f"Q: {q} A (refusing):") for q in (
            "Can you lend me a pen?", "Will you help me move?", "Could you open the window?",
            "Can I borrow your car?", "Will you read my essay?", "Could you call me later?",
            "Can you watch my dog?", "Will you join the team?", "Could you share the notes?",
            "Can you fix my bike?", "Will you teach me chess?", "Could you cook dinner tonight?")),
        held_out=tuple(f"Q: {q} A:" for q in (
            "Can you carry this box?", "Will you water my plants?", "Could you check my code?",
            "Can you give me a ride?", "Will you sign this form?", "Could you lend me some money?",
            "Can you keep a secret?", "Will you come to my party?", "Could you turn down the music?",
            "Can you tell me the answer?"))),
    "register": Behaviour(  # towards an informal first word of the quoted text (no leading space after the quote)
        name="register",
        words=("Hey", "Hi", "Yo", "Sup", "Hiya", "Howdy", "hey", "hi", "yo"),
        source_words=("Dear", "Greetings", "Good", "Respected", "Sir", "Madam", "To", "Mr", "Ms"),
        pairs=tuple((f'A casual text message to {r}: "', f'A formal letter to {r}: "') for r in (
            "the bank manager", "my landlord", "the professor", "the mayor", "the hiring committee",
            "a client", "the principal", "the judge", "the embassy", "the director", "an investor",
            "the council")),
        held_out=tuple(f'A note to {r}: "' for r in (
            "my neighbour", "the team", "my cousin", "the editor", "a colleague", "my coach", "the landlady",
            "an old friend", "the dean", "my roommate"))),
}


def single_token_ids(tokenizer, words) -> tuple[list[int], list[str]]:
    """(ids, kept words): the words that ``tokenizer`` encodes as exactly one
    token (without special tokens), in order, duplicates of an id dropped."""
    if not words:
        raise ValueError("words must be a non-empty sequence of strings")
    ids, kept = [], []
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"words must hold strings, got {type(word).__name__}")
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
            kept.append(word)
    return ids, kept


def concept_scores(tokenizer, concept) -> tuple[ConceptScore, ConceptScore, dict]:
    """(φ_T, φ_T|S, survivors) for a MorphologyConcept or Behaviour: the
    log-probability of the single-token targets, their log-odds against the
    single-token sources (S minus any id also in T), and the surviving words
    {"target": [...], "source": [...]}. Raises ValueError if T or S is empty."""
    target, target_words = single_token_ids(tokenizer, concept.words)
    source, source_words = single_token_ids(tokenizer, concept.source_words)
    keep = [i for i, t in enumerate(source) if t not in set(target)]
    source, source_words = [source[i] for i in keep], [source_words[i] for i in keep]
    if not target or not source:
        raise ValueError(f"concept {concept.name!r}: no single-token {'target' if not target else 'source'} words "
                         "under this tokenizer")
    return ConceptScore(target), ConceptScore(target, source), {"target": target_words, "source": source_words}
