"""Verbalizer shift on the embedded SmolLM2-135M-Instruct (slow: loads the model).

Oracle: the exact alignment of the empirical head Fishers through the kernel
identity ⟨F̂_i, F̂_j⟩ = mean_{x, x′} (a·a′)²(e·e′)² (docs/design.md §7), with a =
hidden_states[-1] and e = softmax(z) − e_y over the full vocabulary computed
one unpadded prompt at a time, independently of sketch_model."""
import pytest
import torch

from fisherfast.sketch import SketchSpec, alignment
from fisherfast.sketch.model import sketch_tasks
from fisherfast.sketch.tasks import verbalizer_tasks

pytestmark = pytest.mark.slow
N_PROMPTS = 16


def head_data(model, tokenizer, prompts):
    """(A (n, d), P (n, V)) float64 at each prompt's last token."""
    A, P = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
            A.append(out.hidden_states[-1][0, -1].double())
            P.append(out.logits[0, -1].double().softmax(-1))
    return torch.stack(A), torch.stack(P)


def cosines(G):
    d = G.diagonal().sqrt()
    return G / (d[:, None] * d[None, :])


def test_fisher_alignment_separates_verbalizers_that_activations_cannot():
    pytest.importorskip("transformers")
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    tasks = verbalizer_tasks(n=N_PROMPTS)
    assert len({t.prompts for t in tasks}) == 1
    spec = SketchSpec(d=model.config.hidden_size, K=model.get_output_embeddings().out_features, m=4096)
    states = sketch_tasks(model, tokenizer, tasks, spec=spec, progress=False)
    sketch = alignment(states)
    S_a = alignment(states, kind="activation").A

    A, P = head_data(model, tokenizer, tasks[0].prompts)  # the tasks share their prompts
    E = [P - torch.nn.functional.one_hot(torch.tensor(t.label_ids(tokenizer)), P.shape[1]) for t in tasks]
    n = len(tasks)
    exact = cosines(torch.tensor([[float(((A @ A.T).square() * (Ei @ Ej.T).square()).mean()) for Ej in E]
                                  for Ei in E], dtype=torch.float64))
    exact_S_a = torch.ones(n, n, dtype=torch.float64)  # one A for all tasks

    off = ~torch.eye(n, dtype=torch.bool)
    assert float((sketch.A - exact).abs()[off].max()) <= 0.05  # the accuracy bar
    # same prompts: every activation-only similarity is 1 (the sketch's included) ...
    torch.testing.assert_close(S_a, exact_S_a)
    # ... while verbalizers over different answer tokens have nearly orthogonal head Fishers
    names = [t.name for t in tasks]
    yes_no = names.index("yes_no")
    for other in ("good_bad", "a_b"):
        assert float(exact[yes_no, names.index(other)]) < 0.2
        assert float(sketch.A[yes_no, names.index(other)]) < 0.2
