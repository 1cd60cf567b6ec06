"""Built-in natural prompts for the real-model metric diagnostics.

Short, ordinary English sentence openings of many kinds (facts, narrative,
instructions, dialogue, code, lists), written for fisherfast. The metric is
taken at each prompt's last token, where the model predicts the next one.
"""
from __future__ import annotations

import pathlib

NATURAL_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "She opened the door and saw",
    "To make a cup of tea, first boil",
    "The meeting has been moved to next",
    "My favourite season of the year is",
    "Water freezes at a temperature of",
    "He picked up the phone and said",
    "The best way to learn a new language is",
    "After the rain stopped, the children ran",
    "In 1969, the first humans walked on the",
    "The recipe calls for two cups of",
    "Please remember to lock the",
    "The train to London leaves at",
    "Photosynthesis is the process by which plants",
    "Once upon a time, in a small village, there lived",
    "The stock market fell sharply after the",
    "def add(a, b):\n    return",
    "Dear Sir or Madam,\n\nI am writing to",
    "The largest planet in our solar system is",
    "I can't believe you forgot my",
    "Q: What is two plus two?\nA:",
    "The dog barked loudly at the",
    "Scientists have discovered a new species of",
    "Turn left at the next traffic light and then",
    "The museum is closed on",
    "Her grandmother taught her how to",
    "The most important thing in a job interview is",
    "The sun rises in the east and sets in the",
    "He was so tired that he fell asleep on the",
    "Monday, Tuesday, Wednesday,",
    "The book was much better than the",
    "Thank you very much for your",
    "The chemical symbol for gold is",
    "If you mix red and blue paint, you get",
    "The weather forecast for tomorrow says it will",
    "Our team won the match by three",
)


def load_prompts(path: str | pathlib.Path | None = None) -> list[str]:
    """The built-in prompts, or one prompt per non-empty line of ``path``.

    A literal ``\\n`` in a line of the file stands for a newline."""
    if path is None:
        return list(NATURAL_PROMPTS)
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} has no non-empty lines")
    return prompts
