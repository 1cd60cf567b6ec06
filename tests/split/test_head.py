"""The output head (``fisherfast.split.Head``): logits and every streamed metric
quantity against the float64 formula from autograd.

Oracle: z(a) = c·tanh(s(W a + b)/c) (or s(W a + b)) written out here, its
Jacobian J = ∂z/∂a by torch.autograd, p = softmax(z), and the head metric
G = Jᵀ (diag p − p pᵀ) J, all in float64. Error model: float64 throughout
(the ops' reference and CPU paths accumulate float64 in float64) over V = 50
terms of order one: ≲ 1e-14 relative; 1e-11 allowed.
"""
import pytest
import torch

from fisherfast.split import Head, SplitModel, output_head
from tiny_models import tiny_causal_lm

V, D, B = 50, 8, 3
TOL = dict(rtol=1e-11, atol=1e-11)


def head_and_inputs(scale, softcap, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 2.0 * torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    a = torch.randn(B, D, generator=g, dtype=torch.float64)
    return Head(W, b, scale, softcap), a, torch.randn(D, 4, generator=g, dtype=torch.float64)


def oracle(head, a_row):
    def z(a):
        lin = head.scale * (head.W @ a + head.b)
        return lin if head.softcap is None else head.softcap * torch.tanh(lin / head.softcap)

    J = torch.autograd.functional.jacobian(z, a_row)
    p = torch.softmax(z(a_row), -1)
    return z(a_row), J.T @ (torch.diag(p) - torch.outer(p, p)) @ J


@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_head_quantities_match_the_float64_formula(scale, softcap):
    head, a, U = head_and_inputs(scale, softcap)
    refs = [oracle(head, a[i]) for i in range(B)]
    z_ref = torch.stack([z for z, _ in refs])
    G_ref = torch.stack([G for _, G in refs])
    torch.testing.assert_close(head.logits(a), z_ref, **TOL)
    torch.testing.assert_close(head.logsumexp(a), torch.logsumexp(z_ref, -1), **TOL)
    torch.testing.assert_close(head.gram(a), G_ref, **TOL)
    torch.testing.assert_close(head.gram(a, reduce="mean"), G_ref.mean(0), **TOL)
    torch.testing.assert_close(head.matmat(a, U), G_ref @ U, **TOL)
    torch.testing.assert_close(head.matmat(None, U, logits=head.linear_logits(a)), G_ref @ U, **TOL)
    torch.testing.assert_close(head.quad(a, U), U.T @ G_ref @ U, **TOL)
    truncated = head.gram_topk(a, tail_tol=1e-300)  # keeps every row: the full metric
    torch.testing.assert_close(truncated.G, G_ref, **TOL)


def test_head_of_a_model_reads_its_transform():
    """Cohere's logit_scale multiplies, Granite's logits_scaling divides, Gemma-2's cap caps:
    head.logits equals the model's own logits from its final hidden states."""
    for model_type, expect in (("cohere", (0.5, None)), ("granite", (0.25, None)), ("gemma2", (1.0, 3.0))):
        model = tiny_causal_lm(model_type, layers=1)
        head = output_head(model)
        assert (head.scale, head.softcap) == expect
        ids = torch.tensor([[3, 4, 5]])
        out = model(ids, output_hidden_states=True)
        a = model.base_model(ids).last_hidden_state
        torch.testing.assert_close(head.logits(a), out.logits, **TOL)
        split = SplitModel(model, 1)
        assert (split.head.scale, split.head.softcap, split.logit_softcap) == (*expect, expect[1])
        assert split.W is split.head.W and torch.equal(split.W, head.W) and split.b is split.head.b
