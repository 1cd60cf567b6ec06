"""The steering tests' oracle: a plain hook, written without fisherfast's steering
machinery, that adds a vector at chosen columns of the layer-ℓ hidden state."""
from __future__ import annotations

from fisherfast.split import decoder_blocks


def column_hook(model, layer, v, columns):
    """Adds v at the columns ``columns(T)`` (T: the call's width) of every row of the
    layer-ℓ state: a forward pre-hook on block ℓ (ℓ < L), or a forward hook on the
    last block's output (ℓ = L). Returns the removable handle."""
    blocks = decoder_blocks(model)

    def add(h):
        h = h.clone()
        for p in columns(h.shape[1]):
            if p < h.shape[1]:
                h[:, p] += v
        return h

    if layer < len(blocks):
        def pre(module, args, kwargs):
            if args:
                return (add(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}
        return blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
    return blocks[-1].register_forward_hook(lambda m, a, out: (add(out[0]), *out[1:]) if isinstance(out, tuple)
                                            else add(out))
