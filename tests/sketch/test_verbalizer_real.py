"""Verbalizer shift on the embedded SmolLM2-135M-Instruct (slow: loads the model).

Oracle: the exact alignments of the empirical head Fishers and of the
activation second moments through the kernel identity, ⟨F̂_i, F̂_j⟩ =
mean_{x, x′} (a·a′)²(e·e′)² and ⟨M̂_i, M̂_j⟩ = mean (a·a′)² (docs/design.md §7), with
a = hidden_states[-1] and e = softmax(z) − e_y over the full vocabulary
computed one unpadded prompt at a time, independently of sketch_model. Tasks:
four verbalizers of the same 16 reviews (identical activations), yes_no on 16
other reviews, and true/false statements (another domain)."""
import pytest
import torch

from fisherfast.sketch import SketchSpec, alignment
from fisherfast.sketch.model import sketch_tasks
from fisherfast.sketch.tasks import PromptTask, verbalizer_tasks

pytestmark = pytest.mark.slow
N_PROMPTS = 16
STATEMENTS = (("Water boils at 100 degrees Celsius.", True), ("The sun rises in the west.", False),
              ("A week has seven days.", True), ("Fish breathe through lungs.", False),
              ("Paris is in France.", True), ("Ice is hotter than steam.", False),
              ("Bees make honey.", True), ("The moon is made of cheese.", False))


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


def test_fisher_alignment_against_kernel_identity_across_verbalizers_and_prompts():
    pytest.importorskip("transformers")
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    facts = PromptTask("facts", tuple(f"Statement: {s}\nIs this statement true? Answer:" for s, _ in STATEMENTS),
                       tuple(" Yes" if t else " No" for _, t in STATEMENTS))
    tasks = [*verbalizer_tasks(n=N_PROMPTS), *verbalizer_tasks(["yes_no"], n=N_PROMPTS, offset=N_PROMPTS,
                                                                  suffix="_other"), facts]
    spec = SketchSpec(d=model.config.hidden_size, K=model.get_output_embeddings().out_features, m=4096)
    states = sketch_tasks(model, tokenizer, tasks, spec=spec, progress=False)
    sketch, act = alignment(states), alignment(states, kind="activation")

    data = {}
    for task in tasks:
        if task.prompts not in data:
            data[task.prompts] = head_data(model, tokenizer, task.prompts)
    A = [data[t.prompts][0] for t in tasks]
    E = [data[t.prompts][1] - torch.nn.functional.one_hot(torch.tensor(t.label_ids(tokenizer)), spec.K)
         for t in tasks]
    exact = cosines(torch.tensor([[float(((Ai @ Aj.T).square() * (Ei @ Ej.T).square()).mean())
                                   for Aj, Ej in zip(A, E)] for Ai, Ei in zip(A, E)], dtype=torch.float64))
    exact_S_a = cosines(torch.tensor([[float((Ai @ Aj.T).square().mean()) for Aj in A] for Ai in A],
                                     dtype=torch.float64))

    n = len(tasks)
    off = ~torch.eye(n, dtype=torch.bool)
    assert float((sketch.A - exact).abs()[off].max()) <= 0.05  # the accuracy bar
    z = ((sketch.A - exact) / sketch.stderr)[off]
    assert float(z.abs().max()) <= 5, z  # the error bars cover the projection error
    # activations: 1 for the verbalizers of one prompt set, below 1 across prompt sets, sketch ≈ exact
    names = [t.name for t in tasks]
    same = torch.tensor([[ti.prompts == tj.prompts for tj in tasks] for ti in tasks])
    torch.testing.assert_close(exact_S_a[same], torch.ones(int(same.sum()), dtype=torch.float64))
    assert float((act.A - exact_S_a).abs().max()) <= 0.003  # measured: 3e-4
    other, fact = names.index("yes_no_other"), names.index("facts")  # measured exact S_a: 0.998, 0.893
    assert float(exact_S_a[0, other]) < 0.999 and float(exact_S_a[0, fact]) < 0.95
    for j in (other, fact):  # the sketch resolves S_a < 1 beyond its error bar
        assert float(act.A[0, j]) < 1 - 3 * float(act.stderr[0, j])
    # verbalizers over different answer tokens have nearly orthogonal head Fishers, the same task on
    # other prompts a highly aligned one
    yes_no = names.index("yes_no")
    for name in ("good_bad", "a_b"):
        assert float(exact[yes_no, names.index(name)]) < 0.2 and float(sketch.A[yes_no, names.index(name)]) < 0.2
    assert float(exact[yes_no, other]) > 0.9 and float(sketch.A[yes_no, other]) > 0.9
