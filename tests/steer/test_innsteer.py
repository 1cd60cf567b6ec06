"""INNSteer against independent oracles.

Oracles: the round trip φ⁻¹∘φ and φ∘φ⁻¹ (identity); torch.linalg.slogdet of the
Jacobian from torch.func.jacrev for the log-determinant; the Gaussian NLL
written out from jacrev's log-determinant, and scipy's multivariate normal
log-density for the untrained network (which is the standardization alone)
and for the first training loss; on two Gaussian classes, the closed-form
LDA rule (Bayes-optimal for a shared covariance) fitted in numpy on the
original activations judges the steered ones.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fisherfast.steer import INNSteer

D = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The networks here are tiny, so intra-op threads only add synchronization: the
    250-step fit below takes 0.6 s on one thread and 19 s on two of a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_network(d=D, n_layers=4, hidden=16, seed=0) -> INNSteer:
    """A float64 INNSteer whose weights (N(0, 0.2²)) and standardization are random:
    couplings far from the identity (|z − standardized h| up to 10 for |h| ≤ 9) with
    a Jacobian condition number below 30, as a trained network has (~200 on
    ``two_classes``); N(0, 0.5²) weights reach 10⁵ and test conditioning, not φ."""
    inn = INNSteer(d, n_layers, hidden, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in inn.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        inn.mean.copy_(torch.randn(d, generator=g, dtype=torch.float64))
        inn.scale.copy_(torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.3)
    return inn.requires_grad_(False)


def two_classes(n=150, d=D, seed=1):
    """Two Gaussian classes with a shared non-isotropic covariance (condition 10⁴),
    means ±3 along a random unit direction u."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, d, dtype=torch.float64)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u /= u.norm()
    h_pos = torch.randn(n, d, generator=g, dtype=torch.float64) @ A.T + 3 * u
    h_neg = torch.randn(n, d, generator=g, dtype=torch.float64) @ A.T - 3 * u
    return h_pos, h_neg


def lda_rule(h_pos, h_neg):
    """x ↦ whether LDA (pooled within-class covariance, midpoint threshold) says positive."""
    P, N = h_pos.numpy(), h_neg.numpy()
    mu_p, mu_n = P.mean(0), N.mean(0)
    S = np.cov(np.concatenate([P - mu_p, N - mu_n]).T)
    w = np.linalg.solve(S, mu_p - mu_n)
    c = w @ (mu_p + mu_n) / 2
    return lambda x: (x.detach().numpy() @ w) > c


@pytest.fixture(scope="module")
def fitted():
    h_pos, h_neg = two_classes()
    inn = INNSteer(D, n_layers=4, hidden=32, seed=0, dtype=torch.float64)
    losses = inn.fit(h_pos, h_neg, steps=250, lr=3e-3, progress=False)
    return inn, losses, h_pos, h_neg


# ------------------------------------------------------------------ the invertible map

# round trip error ≲ cond(J) · eps · max|x| ≈ 30 · eps · 9: 6e-14 (float64), 3e-5 (float32)
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_inverse_is_exact(dtype, atol):
    inn = random_network().to(dtype)
    x = 3 * torch.randn(64, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    z, _ = inn(x)
    standardized = (x - inn.mean) / inn.scale
    assert (z - standardized).abs().max() > 1.0  # the couplings do something
    torch.testing.assert_close(inn.inverse(z), x, rtol=0, atol=atol)
    torch.testing.assert_close(inn(inn.inverse(x))[0], x, rtol=0, atol=atol)


def test_logdet_matches_jacobian():
    inn = random_network(d=7, n_layers=5)  # odd d: unequal halves
    h = torch.randn(5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, logdet = inn(h)
    for i in range(len(h)):
        J = torch.func.jacrev(lambda x: inn(x[None])[0][0])(h[i])
        sign, logabs = torch.linalg.slogdet(J)
        assert sign != 0
        assert abs(float(logabs) - float(logdet[i])) < 1e-12
    assert logdet.std() > 0.1  # the log-determinant depends on h


def test_nll_explicit_formula():
    inn = random_network()
    h = torch.randn(20, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z, _ = inn(h)
    logabs = torch.stack([torch.linalg.slogdet(torch.func.jacrev(lambda x: inn(x[None])[0][0])(hi)).logabsdet
                          for hi in h])
    expected = (0.5 * z.square().sum(1) + D / 2 * math.log(2 * math.pi) - logabs).mean()
    assert abs(float(inn.nll(h)) - float(expected)) < 1e-12 * abs(float(expected))


def test_untrained_network_is_the_standardization():
    inn = INNSteer(D, hidden=16, dtype=torch.float64).requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        inn.mean.copy_(torch.randn(D, generator=g, dtype=torch.float64))
        inn.scale.copy_(torch.rand(D, generator=g, dtype=torch.float64) + 0.5)
    h = torch.randn(30, D, generator=g, dtype=torch.float64)
    logpdf = scipy.stats.multivariate_normal(inn.mean.numpy(), np.diag(inn.scale.numpy() ** 2)).logpdf(h.numpy())
    assert abs(float(inn.nll(h)) + logpdf.mean()) < 1e-12 * abs(logpdf.mean())


# ------------------------------------------------------------------ training and steering

def test_first_loss_is_the_objective_at_the_standardization():
    h_pos, h_neg = two_classes(n=40)
    inn = INNSteer(D, hidden=16, dtype=torch.float64)
    separation, margin = 0.7, 5.0  # margin beyond the standardized gap: the hinge is active
    loss0 = inn.fit(h_pos, h_neg, steps=1, separation=separation, margin=margin, progress=False)[0]
    H = torch.cat([h_pos, h_neg]).numpy()
    mu, sigma = H.mean(0), H.std(0)
    nll = -scipy.stats.multivariate_normal(mu, np.diag(sigma ** 2)).logpdf(H).mean()
    gap = np.linalg.norm((h_pos.numpy().mean(0) - h_neg.numpy().mean(0)) / sigma)
    assert gap < margin
    expected = nll / D + separation * (margin - gap) ** 2  # the couplings' log-det is 0 at init
    assert abs(loss0 - expected) < 1e-12 * expected


def test_loss_after_one_step_is_the_objective():
    h_pos, h_neg = two_classes(n=40)
    options = dict(lr=0.05, separation=0.7, margin=5.0, logdet_weight=3.0, progress=False)
    inn = INNSteer(D, hidden=16, dtype=torch.float64)
    loss1 = inn.fit(h_pos, h_neg, steps=2, **options)[1]
    inn.fit(h_pos, h_neg, steps=1, **options)  # leaves the weights after one update, where loss1 was taken
    with torch.no_grad():
        z_pos, logdet_pos = inn(h_pos)
        z_neg, logdet_neg = inn(h_neg)
    z, logdet = torch.cat([z_pos, z_neg]).numpy(), torch.cat([logdet_pos, logdet_neg]).numpy()
    ell = logdet + np.log(inn.scale.numpy()).sum()  # the couplings' part
    assert np.abs(ell).max() > 0.1
    nll = (0.5 * (z ** 2).sum(1) + D / 2 * np.log(2 * np.pi) - logdet).mean()
    gap = np.linalg.norm(z_pos.numpy().mean(0) - z_neg.numpy().mean(0))
    expected = nll / D + 0.7 * max(0.0, 5.0 - gap) ** 2 + 3.0 * ((ell / D) ** 2).mean()
    assert abs(loss1 - expected) < 1e-12 * expected


def test_fit_lowers_loss_and_separates(fitted):
    inn, losses, h_pos, h_neg = fitted
    assert np.mean(losses[-10:]) < losses[0] - 0.5
    sigma = torch.cat([h_pos, h_neg]).std(0, correction=0)
    gap0 = float(((h_pos.mean(0) - h_neg.mean(0)) / sigma).norm())  # the latent gap before training
    assert gap0 < 1.9
    assert float(inn.direction.norm()) > 0.9 * 2.0  # near the default margin
    z_pos, z_neg = inn(h_pos)[0], inn(h_neg)[0]
    torch.testing.assert_close(inn.direction, (z_pos.mean(0) - z_neg.mean(0)).detach(), rtol=1e-12, atol=1e-12)


def test_steering_crosses_the_lda_boundary(fitted):
    inn, _, h_pos, h_neg = fitted
    positive = lda_rule(h_pos, h_neg)
    assert positive(h_neg).mean() < 0.05 and positive(h_pos).mean() > 0.95
    assert positive(inn.steer(h_neg, 1.0)).mean() > 0.95
    assert positive(inn.steer(h_pos, -1.0)).mean() < 0.05
    assert positive(inn.steer(h_neg, 0.3)).mean() < positive(inn.steer(h_neg, 1.0)).mean()


def test_alpha_zero_is_identity_and_delta(fitted):
    inn, _, _, h_neg = fitted
    assert torch.equal(inn.steer(h_neg, 0.0), h_neg)
    assert torch.equal(inn.delta(h_neg, 0), torch.zeros_like(h_neg))
    steered = inn.steer(h_neg, 0.8)
    torch.testing.assert_close(inn.delta(h_neg, 0.8), steered - h_neg, rtol=0, atol=0)
    torch.testing.assert_close(inn.delta(h_neg[3], 0.8), steered[3] - h_neg[3], rtol=0, atol=1e-14)
    torch.testing.assert_close(inn(steered)[0], inn(h_neg)[0] + 0.8 * inn.direction, rtol=0, atol=1e-12)


def test_progress_bar_runs(capsys):
    h_pos, h_neg = two_classes(n=10)
    losses = INNSteer(D, hidden=8, dtype=torch.float64).fit(h_pos, h_neg, steps=3, progress=True)
    assert len(losses) == 3
    assert "INNSteer" in capsys.readouterr().err


# ------------------------------------------------------------------ determinism and files

def test_same_seed_same_network():
    h_pos, h_neg = two_classes(n=30)

    def trained(seed):
        inn = INNSteer(D, n_layers=3, hidden=16, seed=seed, dtype=torch.float64)
        return inn, inn.fit(h_pos, h_neg, steps=20, lr=1e-2, progress=False)

    (a, la), (b, lb), (c, _) = trained(0), trained(0), trained(1)
    assert la == lb
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert torch.equal(a.steer(h_neg, 1.0), b.steer(h_neg, 1.0))
    assert not torch.equal(a.steer(h_neg, 1.0), c.steer(h_neg, 1.0))
    assert a.fit(h_pos, h_neg, steps=20, lr=1e-2, progress=False) == la  # fit starts afresh


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_save_load_round_trip(tmp_path, dtype):
    h_pos, h_neg = two_classes(n=30)
    inn = INNSteer(D, n_layers=3, hidden=16, seed=4, dtype=dtype)
    inn.fit(h_pos.to(dtype), h_neg.to(dtype), steps=10, lr=1e-2, progress=False)
    inn.save(tmp_path / "inn.safetensors")
    back = INNSteer.load(tmp_path / "inn.safetensors")
    assert back.config() == inn.config() and back.fitted
    h = h_neg.to(dtype)
    assert torch.equal(back(h)[0], inn(h)[0]) and torch.equal(back(h)[1], inn(h)[1])
    assert torch.equal(back.steer(h, 1.5), inn.steer(h, 1.5))
    INNSteer(D, seed=4).save(tmp_path / "raw.safetensors")
    assert not INNSteer.load(tmp_path / "raw.safetensors").fitted


def test_load_rejects_other_files(tmp_path):
    inn = INNSteer(D, n_layers=2, hidden=8, dtype=torch.float64)
    good = tmp_path / "inn.safetensors"
    inn.save(good)
    with safe_open(good, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    def rewritten(name, meta=meta, tensors=tensors):
        path = tmp_path / name
        save_file(tensors, path, metadata=meta)
        return path

    cases = {
        "format": rewritten("format.safetensors", {**meta, "format": "fisherfast.sketch.state"}),
        "version": rewritten("version.safetensors", {**meta, "version": "999"}),
        "config": rewritten("config.safetensors", {**meta, "config": json.dumps({"d": D})}),
        "shape": rewritten("shape.safetensors", tensors={**tensors, "mean": torch.zeros(D + 1, dtype=torch.float64)}),
        "dtype": rewritten("dtype.safetensors", tensors={**tensors, "mean": tensors["mean"].float()}),
        "missing": rewritten("missing.safetensors", tensors={k: v for k, v in tensors.items() if k != "scale"}),
        "nan": rewritten("nan.safetensors", tensors={**tensors, "mean": torch.full((D,), math.nan,
                                                                                  dtype=torch.float64)}),
    }
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    cases.update(truncated=truncated, garbage=garbage)
    for what, path in cases.items():
        with pytest.raises(ValueError, match=str(path.name)):
            INNSteer.load(path)
    with pytest.raises(FileNotFoundError):
        INNSteer.load(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------ bad input

def test_bad_inputs_raise_before_work():
    h_pos, h_neg = two_classes(n=10)
    inn = INNSteer(D, hidden=8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fit"):
        inn.steer(h_neg, 1.0)
    with pytest.raises(ValueError, match=r"h_pos: expected a tensor of shape \(n, 8\)"):
        inn.fit(h_pos[:, :5], h_neg)
    with pytest.raises(ValueError, match="h_neg: expected a tensor of shape"):
        inn.fit(h_pos, h_neg[0])
    with pytest.raises(ValueError, match="h: expected a tensor of shape"):
        inn(h_neg[0])
    with pytest.raises(ValueError, match="at least one sample"):
        inn.fit(h_pos, h_neg[:0])
    bad = h_neg.clone()
    bad[2, 3] = math.nan
    with pytest.raises(ValueError, match="h_neg: expected finite values"):
        inn.fit(h_pos, bad)
    with pytest.raises(TypeError, match="h_neg: expected the network's dtype torch.float64"):
        inn.fit(h_pos, h_neg.float())
    with pytest.raises(ValueError, match="steps: expected an int ≥ 1"):
        inn.fit(h_pos, h_neg, steps=0)
    with pytest.raises(ValueError, match="lr: expected a finite number > 0"):
        inn.fit(h_pos, h_neg, lr=-1e-3)
    with pytest.raises(ValueError, match="separation: expected a finite number ≥ 0"):
        inn.fit(h_pos, h_neg, separation=-1)
    assert not inn.fitted  # nothing was trained by the calls above
    inn.fit(h_pos, h_neg, steps=1, progress=False)
    with pytest.raises(ValueError, match="alpha: expected a finite number"):
        inn.steer(h_neg, math.inf)
    with pytest.raises(ValueError, match=r"z: expected a tensor of shape \(n, 8\)"):
        inn.inverse(h_neg[:, :4])
    with pytest.raises(ValueError, match="h: expected a tensor"):
        inn.delta(h_neg[None], 1.0)
    for kwargs, message in (({"d": 1}, "d: expected an int ≥ 2"), ({"d": D, "n_layers": 0}, "n_layers"),
                            ({"d": D, "dtype": torch.float16}, "dtype"),
                            ({"d": D, "max_log_scale": 0.0}, "max_log_scale")):
        with pytest.raises(ValueError, match=message):
            INNSteer(**kwargs)


# ------------------------------------------------------------------ matched probability

def test_innsteer_matched_probability_by_scale_to_target(tiny_lm):
    """INNSteer's displacement depends on h, so α is found by scale_to_target on the
    callable α ↦ inn.delta(h, α): the score there, read off the model's own forward with
    δ added to block ℓ's input by a plain hook, is the target (the first crossing)."""
    from fisherfast.split import SplitModel
    from fisherfast.steer import ConceptScore, scale_to_target

    model = tiny_lm("llama", head_scale=10.0)
    split = SplitModel(model, 1)
    prompt = [3, 14, 15, 9, 2, 6]
    ctx = split.context(prompt)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(split.d, generator=g, dtype=torch.float64)
    h_pos = ctx.h + u + 0.3 * torch.randn(40, split.d, generator=g, dtype=torch.float64)
    h_neg = ctx.h - u + 0.3 * torch.randn(40, split.d, generator=g, dtype=torch.float64)
    inn = INNSteer(split.d, n_layers=2, hidden=16, seed=0, dtype=torch.float64)
    inn.fit(h_pos, h_neg, steps=30, lr=3e-3, progress=False)

    def displacement(alpha):
        return inn.delta(ctx.h, alpha)

    p0 = torch.softmax(split.logits(ctx, ctx.h), -1)
    p1 = torch.softmax(split.logits(ctx, ctx.h + displacement(1.0)), -1)
    token = int((p1.log() - p0.log()).argmax())  # a token INNSteer's direction raises
    concept = ConceptScore([token])
    target = 0.5 * float(p0[token].log() + p1[token].log())
    alpha = scale_to_target(split, ctx, concept, displacement, target)
    assert 0 < alpha < 1.0

    t = len(prompt) - 1
    delta = displacement(alpha)

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = torch.cat([x[:, :t], x[:, t:] + delta], dim=1)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = model.model.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        z = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    finally:
        handle.remove()
    # the oracle is transformers' own forward, whose eager attention takes the softmax in float32
    # even in a float64 model (the split does not): ~1e-7 relative on φ
    assert float(torch.log_softmax(z, -1)[token]) == pytest.approx(target, abs=1e-6)
