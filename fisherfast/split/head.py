"""The output head of a causal LM: everything between the head input a (the
final normed hidden state) and the logits (docs/design.md §2, §3).

    z_lin = s · (W a + b)                      (s: the model's linear logit scale)
    z     = c · tanh(z_lin / c)  if c is set   (final soft-capping), else z_lin

s is Cohere's ``logit_scale`` (multiply), Granite's ``1 / logits_scaling``
(divide), HyperCLOVA X's ``logits_scaling`` and Falcon-H1's
``lm_head_multiplier``; c is Gemma-2/3's ``final_logit_softcapping``. These
are every transform transformers 5.23's ``*ForCausalLM.forward`` applies
after its ``lm_head``.

Metric quantities go through the fused softmax-Fisher ops with the scale
folded in exactly: z_lin = W (s a) + s b, so the ops run at a' = s a, b' = s b
with W unchanged, and since ∂a'/∂a = s·I,

    G_head(a) = (∂z/∂a)ᵀ F (∂z/∂a) = s² G_ops(a'),

where G_ops is the op's metric ``softcap=c`` included (J_cap = diag(1 − tanh²(z_lin/c))·W).
No V×d copy of W is made.
"""
from __future__ import annotations

import dataclasses

import torch

from fisherfast.split.offload import materialized_parameters

__all__ = ["Head", "head_of"]


@dataclasses.dataclass(frozen=True)
class Head:
    """The model's head: z = softcap(s · (W a + b)) (see the module docstring).

    Attributes:
        W: (V, d) unembedding, detached. b: (V,) bias or None.
        scale: s, the linear logit scale (1.0 for most models).
        softcap: c, the final soft-capping constant, or None.
    """

    W: torch.Tensor
    b: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @property
    def V(self) -> int:
        return self.W.shape[0]

    @property
    def d(self) -> int:
        return self.W.shape[1]

    @property
    def logit_softcap(self) -> float | None:
        """Alias of ``softcap`` (the name of the former ``OutputHead`` field)."""
        return self.softcap

    # ----------------------------------------------------------- logits
    def linear_logits(self, a: torch.Tensor) -> torch.Tensor:
        """z_lin = s (W a + b) before any soft-cap: (..., d) → (..., V), on W's device and dtype."""
        z = a.to(device=self.W.device, dtype=self.W.dtype) @ self.W.T
        if self.b is not None:
            z = z + self.b
        return z * self.scale if self.scale != 1.0 else z

    def logits(self, a: torch.Tensor) -> torch.Tensor:
        """The model's logits z for head inputs a: (..., d) → (..., V) (differentiable in a)."""
        z = self.linear_logits(a)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    # ---------------------------------------------------- streamed over V
    def logsumexp(self, a: torch.Tensor, **options) -> torch.Tensor:
        """log Σ_v exp z_v per row: (B, d) or (d,) → (B,) or 0-dim (``lm_logsumexp``; options: chunk, backend)."""
        from fisherfast.ops import lm_logsumexp

        a_s, b_s = self._folded(a)
        return lm_logsumexp(a_s, self.W, b_s, **self._cap(options))

    def matmat(self, a: torch.Tensor | None, U: torch.Tensor, *, logits: torch.Tensor | None = None,
               **options) -> torch.Tensor:
        """G_head(a_i) U_i per token (``softmax_fisher_matmat``): a (B, d) or (d,), U (d, k) or (B, d, k)
        → (B, d, k) or (d, k). ``logits``: (B, V) precomputed ``linear_logits(a)`` in place of a."""
        from fisherfast.ops import softmax_fisher_matmat

        a_s, b_s = self._folded(a)
        return self._s2(softmax_fisher_matmat(a_s, self.W, U, b_s, logits=logits, **self._cap(options)))

    def quad(self, a: torch.Tensor | None, U: torch.Tensor, *, logits: torch.Tensor | None = None,
             **options) -> torch.Tensor:
        """U_iᵀ G_head(a_i) U_i per token (``softmax_fisher_quad``): → (B, k, k) or (k, k)."""
        from fisherfast.ops import softmax_fisher_quad

        a_s, b_s = self._folded(a)
        return self._s2(softmax_fisher_quad(a_s, self.W, U, b_s, logits=logits, **self._cap(options)))

    def gram(self, a: torch.Tensor | None, *, logits: torch.Tensor | None = None, **options) -> torch.Tensor:
        """The dense d×d head metric G_head(a_i) (``softmax_fisher_gram``; options: reduce, chunk, backend):
        (B, d) → (B, d, d), (d,) → (d, d); reduce="mean" → (d, d)."""
        from fisherfast.ops import softmax_fisher_gram

        a_s, b_s = self._folded(a)
        return self._s2(softmax_fisher_gram(a_s, self.W, b_s, logits=logits, **self._cap(options)))

    def gram_topk(self, a: torch.Tensor | None, *, tail_tol: float, logits: torch.Tensor | None = None,
                  **options):
        """The top-p truncated head metric (``softmax_fisher_gram_topk``), G scaled by s² as ``gram``."""
        from fisherfast.ops import softmax_fisher_gram_topk

        a_s, b_s = self._folded(a)
        out = softmax_fisher_gram_topk(a_s, self.W, b_s, tail_tol=tail_tol, logits=logits, **self._cap(options))
        return dataclasses.replace(out, G=self._s2(out.G)) if self.scale != 1.0 else out

    # ----------------------------------------------------------- private
    def _folded(self, a):
        """(s a, s b): z_lin = W (s a) + s b; (None, None) for a = None (the bias is in given logits)."""
        if a is None:
            return None, None
        a = a.to(device=self.W.device, dtype=self.W.dtype)
        if self.scale == 1.0:
            return a, self.b
        return a * self.scale, (None if self.b is None else self.b * self.scale)

    def _s2(self, G):
        return G * (self.scale * self.scale) if self.scale != 1.0 else G

    def _cap(self, options):
        return options if self.softcap is None else {**options, "softcap": self.softcap}


def head_of(model, head_module: torch.nn.Module | None = None) -> Head:
    """The ``Head`` of a Hugging Face causal LM (weights materialized if
    offloaded by accelerate).

    Raises ValueError naming ``model`` when its output embedding is not an nn.Linear."""
    if head_module is None:
        head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head_module, torch.nn.Linear):
        raise ValueError(f"model: expected a Linear output embedding (get_output_embeddings()), got "
                         f"{type(head_module).__name__}")
    params = materialized_parameters(head_module)
    return Head(params["weight"], params.get("bias"), _logit_scale(model), _softcap(model.config))


def _logit_scale(model) -> float:
    """s of z_lin = s (W a + b), read where each family keeps it (see the module docstring)."""
    config = model.config
    model_type = str(config.model_type)
    if model_type.startswith("cohere") and getattr(model, "logit_scale", None) is not None:
        return float(model.logit_scale)
    if model_type.startswith("granite") and getattr(config, "logits_scaling", None) is not None:
        return 1.0 / float(config.logits_scaling)
    if model_type == "hyperclovax" and getattr(config, "logits_scaling", None) is not None:
        return float(config.logits_scaling)
    multiplier = getattr(getattr(model, "model", None), "lm_head_multiplier", None)
    if model_type == "falcon_h1" and multiplier is not None:
        return float(multiplier)
    return 1.0


def _softcap(config) -> float | None:
    c = getattr(config, "final_logit_softcapping", None)
    if c is None:
        c = getattr(config, "logits_soft_cap", None) if config.model_type == "recurrent_gemma" else None
    return None if c is None else float(c)
