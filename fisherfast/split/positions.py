"""How many positions a causal LM can take (``max_position_embeddings``)."""
from __future__ import annotations

__all__ = ["max_positions", "check_positions"]


def max_positions(model) -> int | None:
    """The model's number of positions (config ``max_position_embeddings`` or
    ``n_positions``), or None when its config names none."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_positions(model, length: int, name: str) -> None:
    """ValueError naming ``name`` when ``length`` tokens exceed the model's positions."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ValueError(f"{name}: {length} tokens exceed the model's {limit} positions "
                         f"(config.max_position_embeddings); shorten the input")
