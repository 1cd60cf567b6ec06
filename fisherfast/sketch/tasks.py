"""Built-in prompt tasks for FisherSketch: one set of prompts, many verbalizers.

A *verbalizer* maps each prompt's ground truth to the answer token the model
is trained (or evaluated) to produce. Verbalizer-shifted tasks share their
prompts, hence their head inputs a, exactly; only the label y (and so the logit
error e = p − e_y, docs/design.md §7) differs. Anything computed from activations
alone sees the same task; the head Fisher F = E[(e eᵀ) ⊗ (a aᵀ)] does not.

The prompts are short product/film reviews written for this package, half
positive and half negative, asked as "Is this review positive?".
"""
from __future__ import annotations

from dataclasses import dataclass

# (review, is_positive); alternating so that every prefix is balanced.
REVIEWS: tuple[tuple[str, bool], ...] = (
    ("The battery lasts all week and the screen is bright.", True),
    ("It broke after two days and support never answered.", False),
    ("A warm, funny film with a cast that clearly loved it.", True),
    ("The plot drags and the ending makes no sense.", False),
    ("Fast delivery, solid build, works exactly as described.", True),
    ("The zipper jammed on the first trip and the seams split.", False),
    ("Best coffee grinder I have owned; quiet and even.", True),
    ("Two hours of my life I will never get back.", False),
    ("The soup was rich and the staff were lovely.", True),
    ("Cold food, rude waiter, and we waited an hour.", False),
    ("Setup took five minutes and the sound is superb.", True),
    ("The app crashes every time I open the camera.", False),
    ("A gripping story that kept me up all night.", True),
    ("The paint peeled within a week of hanging it.", False),
    ("Comfortable shoes that still look new after a year.", True),
    ("The charger overheats and smells of burnt plastic.", False),
    ("Beautiful photography and a score that lingers.", True),
    ("Flat jokes and characters I could not care about.", False),
    ("The hotel room was spotless and the view stunning.", True),
    ("Noisy fan, weak suction, and the filter clogs daily.", False),
    ("My kids play with this puzzle every single day.", True),
    ("Pieces were missing and the box arrived crushed.", False),
    ("Crisp lettuce, fresh bread, a perfect lunch spot.", True),
    ("The steak was gray and the fries were soggy.", False),
    ("The lamp is sturdy, bright and easy to adjust.", True),
    ("Instructions were useless and a screw was missing.", False),
    ("An honest, moving documentary about a small town.", True),
    ("The sequel ruins everything the first film built.", False),
    ("Great value: the blender crushes ice in seconds.", True),
    ("The lid leaks and the handle came off in my hand.", False),
    ("Friendly staff and the cleanest gym in the city.", True),
    ("Overpriced tickets for a show that ended early.", False),
    ("The novel's last chapter left me in happy tears.", True),
    ("Boring from the first page to the last.", False),
    ("The tent stayed dry through a whole night of rain.", True),
    ("The mattress sagged after a month and hurts my back.", False),
    ("Sharp knives that hold their edge for months.", True),
    ("The headphones crackle and the left side died.", False),
    ("A delightful little cafe with the best scones.", True),
    ("Our order was wrong twice and nobody apologized.", False),
    ("The keyboard feels great and the keys are quiet.", True),
    ("The printer jams on every other page.", False),
    ("Clear sound, long range, and a fair price.", True),
    ("The sofa fabric pilled within weeks.", False),
    ("The actors are brilliant and the pacing is tight.", True),
    ("A dull, confusing mess with terrible sound.", False),
    ("Reliable, light and easy to clean; I love it.", True),
    ("The watch strap snapped and the glass scratched.", False),
)

TEMPLATE = "Review: {review}\nIs this review positive? Answer:"

# name -> (answer when positive, answer when negative); each a single token
# (with its leading space) in the SmolLM2 / GPT-2 style BPE vocabularies.
VERBALIZERS: dict[str, tuple[str, str]] = {
    "yes_no": (" Yes", " No"),
    "no_yes": (" No", " Yes"),
    "good_bad": (" Good", " Bad"),
    "a_b": (" A", " B"),
}


@dataclass(frozen=True)
class PromptTask:
    """Prompts with one answer string per prompt (the verbalized ground truth)."""

    name: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]

    def __post_init__(self):
        if len(self.prompts) != len(self.answers) or not self.prompts:
            raise ValueError(f"task {self.name!r}: prompts and answers must be non-empty and of equal length, "
                             f"got {len(self.prompts)} and {len(self.answers)}")

    def label_ids(self, tokenizer) -> list[int]:
        """The token id of each answer; every answer must encode to exactly one token."""
        ids = []
        for answer in sorted(set(self.answers)):
            tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise ValueError(f"task {self.name!r}: answer {answer!r} is {len(tokens)} tokens for this "
                                 f"tokenizer, a verbalizer needs exactly one")
            ids.append((answer, tokens[0]))
        table = dict(ids)
        return [table[a] for a in self.answers]


def verbalizer_tasks(names=None, *, n: int | None = None, offset: int = 0, suffix: str = "") -> list[PromptTask]:
    """The review prompts under each verbalizer in ``names`` (default: all of VERBALIZERS).

    Args:
        names: verbalizer names, keys of ``VERBALIZERS``.
        n: number of prompts (default: all from ``offset``); reviews alternate
            positive/negative, so an even ``n`` is balanced.
        offset: index of the first review, so disjoint prompt sets can be drawn.
        suffix: appended to each task name (e.g. to tell prompt sets apart).
    """
    names = list(VERBALIZERS) if names is None else list(names)
    unknown = [name for name in names if name not in VERBALIZERS]
    if unknown:
        raise ValueError(f"names: expected names among {sorted(VERBALIZERS)}, got {unknown}")
    if not isinstance(offset, int) or not 0 <= offset < len(REVIEWS):
        raise ValueError(f"offset: expected an int in [0, {len(REVIEWS)}), got {offset!r}")
    stop = len(REVIEWS) if n is None else offset + n
    if n is not None and (not isinstance(n, int) or n < 1 or stop > len(REVIEWS)):
        raise ValueError(f"n: expected an int in [1, {len(REVIEWS) - offset}] for offset {offset}, got {n!r}")
    reviews = REVIEWS[offset:stop]
    prompts = tuple(TEMPLATE.format(review=text) for text, _ in reviews)
    tasks = []
    for name in names:
        positive, negative = VERBALIZERS[name]
        answers = tuple(positive if is_positive else negative for _, is_positive in reviews)
        tasks.append(PromptTask(name + suffix, prompts, answers))
    return tasks
