"""Alignment from sketches against the exact kernel identity
⟨F̂_i, F̂_j⟩ = mean over pairs (x, x′) of (a·a′)²(e·e′)² (docs/design.md §7), itself
checked against explicitly materialized empirical Fishers."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from fisherfast.sketch import FisherSketcher, SketchSpec, alignment, marginals
from fisherfast.sketch.alignment import coupling_stderr


def task(theta, W, n, mu=4.0, gen=None):
    """a ∼ N(μ_θ, I) with μ_θ = |μ|(cos θ, sin θ, 0, …), logits a Wᵀ, y ∼ softmax: rotating θ
    turns the head Fisher away from the θ = 0 task (alignment from ≈ 0.9 down to ≈ 0.05)."""
    d = W.shape[1]
    center = torch.zeros(d, dtype=torch.float64)
    center[0], center[1] = mu * math.cos(theta), mu * math.sin(theta)
    a = center + torch.randn(n, d, generator=gen, dtype=torch.float64)
    z = a @ W.T
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(1)
    return a, z, y


def errors(z, y):
    e = torch.softmax(z.double(), -1)
    e[torch.arange(len(y)), y] -= 1
    return e


def kernel(x, x2, power_a=2, power_e=2, offdiag=False):
    """mean over pairs of (a·a′)^power_a (e·e′)^power_e; offdiag drops x = x′ (same sample set)."""
    (a, e), (b, f) = x, x2
    k = (a @ b.T) ** power_a * (e @ f.T) ** power_e
    if offdiag:
        n = k.shape[0]
        return float((k.sum() - k.diagonal().sum()) / (n * (n - 1)))
    return float(k.mean())


def sketch(spec, a, z, y):
    sk = FisherSketcher(spec)
    sk.update(a.float(), logits=z.float(), y=y)
    return sk.state


def test_kernel_identity_equals_materialized_fisher():
    g = torch.Generator().manual_seed(0)
    sets = []
    for n in (7, 9):
        a = torch.randn(n, 3, generator=g, dtype=torch.float64)
        e = errors(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))
        sets.append((a, e))
    fishers = [torch.einsum("nk,nd,nl,nc->kdlc", e, a, e, a).reshape(12, 12) / len(a) for a, e in sets]
    for i, j in itertools.product(range(2), repeat=2):
        assert math.isclose(float((fishers[i] * fishers[j]).sum()), kernel(sets[i], sets[j]), rel_tol=1e-12)


def test_inner_products_are_unbiased_over_seeds():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 3, generator=g, dtype=torch.float64)
    data = [task(theta, W, 6, mu=1.0, gen=g) for theta in (0.0, 1.2)]
    exact = [(errors(z, y), a) for a, z, y in data]
    exact = [[kernel((a, e), (b, f)) for b, f in ((b, f) for f, b in exact)] for e, a in exact]
    seeds = 200
    estimates = torch.empty(seeds, 3, dtype=torch.float64)  # ⟨F̂_0,F̂_0⟩, ⟨F̂_0,F̂_1⟩, ⟨F̂_1,F̂_1⟩
    for seed in range(seeds):
        spec = SketchSpec(d=3, K=5, m=16, seed=seed)
        mu = [sketch(spec, *t).signature().double() for t in data]
        estimates[seed] = torch.stack([mu[0] @ mu[0], mu[0] @ mu[1], mu[1] @ mu[1]])
    target = torch.tensor([exact[0][0], exact[0][1], exact[1][1]], dtype=torch.float64)
    spread = estimates.std(0) / math.sqrt(seeds)
    assert bool(((estimates.mean(0) - target).abs() <= 4 * spread).all()), (estimates.mean(0), target, spread)


def test_alignment_accuracy_at_m4096():
    """m = 4096, n = 2000 per task, two families of 6 tasks (30 pairs) whose exact alignments span
    [0.1, 0.9]: mean |error| ≤ 0.02, max ≤ 0.05. (At (32, 256) two sample sets of 2000 align at most
    ≈ 0.8 even from one distribution: their own x = x′ pairs dominate ‖F̂‖.)"""
    exact, estimate = [], []
    for d, K in ((16, 64), (32, 256)):
        g = torch.Generator().manual_seed(d)
        W = torch.randn(K, d, generator=g, dtype=torch.float64) / 2
        data = [task(theta, W, 2000, gen=g) for theta in (0.0, 0.04, 0.15, 0.4, 0.8, 1.5)]
        spec = SketchSpec(d=d, K=K, m=4096, seed=0)
        A = alignment([sketch(spec, *t) for t in data]).A
        sets = [(a, errors(z, y)) for a, z, y in data]
        k = {(i, j): kernel(sets[i], sets[j]) for i, j in itertools.combinations_with_replacement(range(len(sets)), 2)}
        for i, j in itertools.combinations(range(len(sets)), 2):  # (the kernel is symmetric: i ≤ j only)
            exact.append(k[i, j] / math.sqrt(k[i, i] * k[j, j]))
            estimate.append(float(A[i, j]))
    exact, err = torch.tensor(exact), (torch.tensor(estimate) - torch.tensor(exact)).abs()
    assert len(exact) >= 10 and float(exact.min()) <= 0.1 and float(exact.max()) >= 0.9  # the design spans the range
    assert float(err.mean()) <= 0.02 and float(err.max()) <= 0.05, (exact, err)


def test_debiased_alignment_estimates_the_u_statistic():
    """Small d·K and n = 2000: the x = x′ pairs are a visible bias of the plain estimate, which the
    U-statistic norms remove."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    data = [task(theta, W, 2000, mu=1.0, gen=g) for theta in (0.0, 0.6, 1.3)]
    spec = SketchSpec(d=4, K=6, m=4096, seed=0)
    states = [sketch(spec, *t) for t in data]
    sets = [(a, errors(z, y)) for a, z, y in data]
    u = [kernel(s, s, offdiag=True) for s in sets]
    D = alignment(states, debiased=True).A
    for i, j in itertools.combinations(range(3), 2):
        exact_u = kernel(sets[i], sets[j]) / math.sqrt(u[i] * u[j])
        assert abs(float(D[i, j]) - exact_u) <= 0.03
    with pytest.raises(ValueError, match="debiased"):
        alignment([s.signature() for s in states], debiased=True)


def test_marginals_match_their_kernels_and_signatures_match_states():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 16, generator=g, dtype=torch.float64) / 2
    data = [task(theta, W, 1000, gen=g) for theta in (0.0, 0.7)]
    spec = SketchSpec(d=16, K=64, m=4096, seed=2)
    states = {"left": sketch(spec, *data[0]), "right": sketch(spec, *data[1])}
    sets = [(a, errors(z, y)) for a, z, y in data]

    def exact(pa, pe):
        return kernel(sets[0], sets[1], pa, pe) / math.sqrt(kernel(sets[0], sets[0], pa, pe)
                                                            * kernel(sets[1], sets[1], pa, pe))

    S_a, S_e, rho = marginals(states)
    assert abs(float(S_a[0, 1]) - exact(2, 0)) <= 0.03 and abs(float(S_e[0, 1]) - exact(0, 2)) <= 0.03
    result = alignment(states)
    assert result.names == ["left", "right"]
    torch.testing.assert_close(rho, result.A / (S_a * S_e))
    by_signature = alignment([s.signature() for s in states.values()])
    torch.testing.assert_close(by_signature.A, result.A, rtol=1e-6, atol=1e-6)
    assert by_signature.stderr_sampling is None and result.stderr[0, 0] == 0 and 0 < float(result.stderr[0, 1]) < 0.05
    torch.testing.assert_close(by_signature.stderr, result.stderr_projection, rtol=1e-5, atol=1e-7)


def test_alignment_bad_inputs():
    spec = SketchSpec(d=4, K=6, m=16)
    other = SketchSpec(d=4, K=6, m=16, seed=1)
    a, z, y = torch.randn(5, 4), torch.randn(5, 6), torch.randint(0, 6, (5,))
    with pytest.raises(ValueError, match="different specs"):
        alignment([sketch(spec, a, z, y), sketch(other, a, z, y)])
    with pytest.raises(ValueError, match="one length"):
        alignment([torch.randn(16), torch.randn(8)])
    with pytest.raises(TypeError, match="all SketchStates or all"):
        alignment([sketch(spec, a, z, y), torch.randn(16)])
    with pytest.raises(ValueError, match="kind"):
        alignment([torch.randn(16)], kind="both")
    with pytest.raises(ValueError, match="at least one"):
        alignment([])
    empty = FisherSketcher(spec).state  # never updated: count 0, named in the error
    with pytest.raises(ValueError, match=r"at least one sample in every state, got none in \['empty'\]"):
        alignment({"full": sketch(spec, a, z, y), "empty": empty})


def test_stderr_is_calibrated_over_sketch_seeds():
    """24 sketch seeds × 3 task pairs (n = 200 rows each, m = 512): the z-scores (estimate − exact) /
    stderr_projection against the kernel identity have standard deviation in [0.7, 1.4] for the joint,
    activation and error kinds and for ρ; the sampling-only delta method (the former stderr) does not."""
    g = torch.Generator().manual_seed(11)
    d, K, n = 16, 64, 200
    W = torch.randn(K, d, generator=g, dtype=torch.float64) / 2
    data = [task(theta, W, n, gen=g) for theta in (0.0, 0.3, 1.0)]
    sets = [(a, errors(z, y)) for a, z, y in data]
    powers = {"joint": (2, 2), "activation": (2, 0), "error": (0, 2)}
    exact = {kind: torch.tensor([[kernel(si, sj, pa, pe) for sj in sets] for si in sets]) for kind, (pa, pe) in
             powers.items()}
    exact = {kind: k / torch.outer(k.diagonal().sqrt(), k.diagonal().sqrt()) for kind, k in exact.items()}
    exact["rho"] = exact["joint"] / (exact["activation"] * exact["error"])
    pairs = list(itertools.combinations(range(len(data)), 2))
    z = {kind: [] for kind in (*powers, "rho")}
    z_sampling = []
    for seed in range(24):
        spec = SketchSpec(d=d, K=K, m=512, seed=seed)
        states = [sketch(spec, *t) for t in data]
        for kind in powers:
            result = alignment(states, kind=kind)
            assert bool((result.stderr >= result.stderr_projection).all())
            z[kind] += [float((result.A[i, j] - exact[kind][i, j]) / result.stderr_projection[i, j]) for i, j in pairs]
            if kind == "activation":
                z_sampling += [float((result.A[i, j] - exact[kind][i, j]) / result.stderr_sampling[i, j])
                               for i, j in pairs]
        rho, rho_se = marginals(states).rho, coupling_stderr(states)
        z["rho"] += [float((rho[i, j] - exact["rho"][i, j]) / rho_se[i, j]) for i, j in pairs]
    spread = {kind: float(torch.tensor(values).std()) for kind, values in z.items()}
    assert all(0.7 <= s <= 1.4 for s in spread.values()), spread
    assert float(torch.tensor(z_sampling).std()) > 2.0  # sampling variance alone misses the projection


def test_rank_sources_orders_by_alignment_with_decomposition():
    from fisherfast.sketch import SourceScore, rank_sources

    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, 16, generator=g, dtype=torch.float64) / 2
    thetas = {"far": 1.4, "near": 0.1, "middle": 0.6}
    data = {name: task(theta, W, 400, gen=g) for name, theta in thetas.items()}
    target_data = task(0.0, W, 400, gen=g)
    spec = SketchSpec(d=16, K=64, m=2048, seed=1)
    target = sketch(spec, *target_data)
    ranked = rank_sources(target, {name: sketch(spec, *t) for name, t in data.items()})
    assert [s.name for s in ranked] == ["near", "middle", "far"] and [s.rank for s in ranked] == [1, 2, 3]
    assert all(isinstance(s, SourceScore) and s.count == 400 for s in ranked)
    sets = {name: (a, errors(z, y)) for name, (a, z, y) in data.items()}
    t_set = (target_data[0], errors(*target_data[1:]))
    for s in ranked:  # each part against its exact kernel, within 4 standard errors
        for value, se, (pa, pe) in ((s.A, s.A_stderr, (2, 2)), (s.S_a, s.S_a_stderr, (2, 0)),
                                    (s.S_e, s.S_e_stderr, (0, 2))):
            exact = kernel(t_set, sets[s.name], pa, pe) / math.sqrt(
                kernel(t_set, t_set, pa, pe) * kernel(sets[s.name], sets[s.name], pa, pe))
            assert abs(value - exact) <= 4 * se + 1e-3, (s.name, pa, pe, value, exact, se)
        assert math.isclose(s.rho, s.A / (s.S_a * s.S_e), rel_tol=1e-9) and s.rho_stderr > 0
    with pytest.raises(TypeError, match="target"):
        rank_sources(target.signature(), [target])
    with pytest.raises(ValueError, match="at least one"):
        rank_sources(target, {})


def test_rank_sources_puts_undefined_alignments_last_whatever_the_order():
    """Issue 18.5: a zero-Fisher candidate (every e = 0: the head is certain of its label,
    all other classes masked) has A = 0/0 = NaN, which used to land first, second or third
    depending on dict order. It ranks last, with the reason; a zero-Fisher target is an error."""
    from fisherfast.sketch import rank_sources

    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 8, generator=g, dtype=torch.float64) / 2
    spec = SketchSpec(d=8, K=32, m=256, seed=2)
    good = {name: sketch(spec, *task(theta, W, 100, gen=g)) for name, theta in (("b", 0.2), ("c", 0.9))}
    a = torch.randn(20, 8, generator=g)
    certain = torch.full((20, 32), float("-inf"))
    certain[:, 5] = 0.0  # p = e_5 and y = 5: e = 0
    zero = sketch(spec, a, certain, torch.full((20,), 5))
    assert zero.count == 20 and not bool(zero.sums["joint"].any())
    target = sketch(spec, *task(0.0, W, 100, gen=g))
    orders = (("zero", "b", "c"), ("b", "zero", "c"), ("b", "c", "zero"))
    for order in orders:
        states = {**good, "zero": zero}
        ranked = rank_sources(target, {name: states[name] for name in order})
        assert [s.name for s in ranked] == ["b", "c", "zero"], order
        assert math.isnan(ranked[2].A) and "zero" in ranked[2].undefined and ranked[2].rank == 3
        assert ranked[0].undefined == ranked[1].undefined == ""
    with pytest.raises(ValueError, match="target's joint sketch is zero"):
        rank_sources(zero, good)
    empty = FisherSketcher(spec).state  # no samples at all: named, not ranked
    with pytest.raises(ValueError, match=r"candidates: .* got none in \['never'\]"):
        rank_sources(target, {**good, "never": empty})
    with pytest.raises(ValueError, match="target: expected a state with at least one sample"):
        rank_sources(empty, good)


def test_bad_signatures_and_marginals_of_signatures_are_rejected():
    """Review: NaN/complex signatures gave NaN or silently dropped the imaginary
    part; marginals of signature tensors returned S_a = S_e = A and ρ = 1/A
    (one signature holds one kind); coupling_stderr was missing from
    fisherfast.sketch."""
    import importlib

    import fisherfast.sketch as sketch_pkg

    assert sketch_pkg.coupling_stderr is importlib.import_module("fisherfast.sketch.alignment").coupling_stderr
    good = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN or Inf: \\['b'\\]"):
        alignment({"a": good, "b": torch.tensor([1.0, float("nan"), 0.0])})
    with pytest.raises(TypeError, match="real floating"):
        alignment([good.to(torch.complex64), good.to(torch.complex64)])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        alignment([torch.ones(0), torch.ones(0)])
    with pytest.raises(TypeError, match="marginals needs SketchStates"):
        marginals([good, good.flip(0)])
    with pytest.raises(TypeError, match="debiased: expected a bool"):
        alignment([good, good.flip(0)], debiased="no")
    # the cosine itself (independent oracle: 10 / (√14 √14))
    assert float(alignment([good, good.flip(0)]).A[0, 1]) == pytest.approx(10 / 14, abs=1e-12)


def labelled_task(theta, W, n, gen, mu=4.0):
    """a as in ``task``; labels from a fixed rule y = argmax(a Wᵀ + a shift towards class ⌊4θ⌋), so
    E[e] ≠ 0 and the mean head gradient ḡ = (1/n) Σ e ⊗ a is a systematic direction."""
    a, z, _ = task(theta, W, n, mu, gen)
    shift = torch.zeros(W.shape[0], dtype=torch.float64)
    shift[int(4 * theta)] = 3.0
    y = (z + shift + torch.randn(z.shape, generator=gen, dtype=torch.float64)).argmax(-1)
    return a, z, y


def mean_gradient(a, z, y):
    """ḡ = (1/n) Σ_x e_x ⊗ a_x, (K, d) float64, written out densely."""
    return errors(z, y).T @ a.double() / len(y)


def test_first_moment_is_the_projected_mean_gradient():
    """Issue 21.2: the first moment sums φ = (rᵃ·a)(rᵉ·e)/√m over the spec's own SRHT rows, written
    out densely here (float64), and its mean's inner products are those of ḡ ⊗ projections.
    Error model: the op's features are float32 (u = 6e-8 times a few log₂N additions each), so
    Σφ is within 1e-5 of its largest entry."""
    from test_spec_state import dense_plan

    g = torch.Generator().manual_seed(5)
    W = torch.randn(24, 10, generator=g, dtype=torch.float64) / 2
    spec = SketchSpec(d=10, K=24, m=512, seed=3)
    a, z, y = labelled_task(0.3, W, 60, g)
    state = sketch(spec, a, z, y)
    Ra, _, Re, _ = (dense_plan(p) for p in spec.plans())
    phi = (a.double() @ Ra.T) * (errors(z.float().double(), y) @ Re.T) / math.sqrt(spec.m)
    ref = phi.sum(0)
    torch.testing.assert_close(state.sums["mean"], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(state.sumsqs["mean"], phi.square().sum(0), rtol=1e-4, atol=0)
    # φ̄ = R vec(ḡ)/√m with R's rows r_j = rᵉ_j ⊗ rᵃ_j: the same numbers from the dense mean gradient
    gbar = mean_gradient(a, z.float().double(), y)
    via_g = torch.einsum("jk,kd,jd->j", Re, gbar, Ra) / math.sqrt(spec.m)
    torch.testing.assert_close(state.signature("mean").double(), via_g, rtol=0,
                               atol=1e-5 * float(via_g.abs().max()))


def test_first_moment_cosine_estimates_the_mean_gradient_cosine():
    """cos(φ̄_i, φ̄_j) against the exact cos(ḡ_i, ḡ_j) of the dense mean gradients, over 12 sketch
    seeds: the z-scores (estimate − exact)/stderr_projection (delete-one-feature jackknife) have
    standard deviation in [0.6, 1.5] (a calibrated error bar; 36 z-scores: the sample standard
    deviation of 36 unit normals lies in [0.77, 1.23] with probability > 0.99), and every estimate
    is within 5 standard errors."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(32, 12, generator=g, dtype=torch.float64) / 2
    data = {name: labelled_task(theta, W, 150, g) for name, theta in (("t", 0.1), ("near", 0.2),
                                                                     ("mid", 0.5), ("far", 0.9))}
    gbar = {name: mean_gradient(*d).flatten() for name, d in data.items()}
    exact = {name: float(gbar["t"] @ v / (gbar["t"].norm() * v.norm())) for name, v in gbar.items()}
    assert exact["near"] > 0.5 and exact["far"] < exact["near"]
    zs = []
    for seed in range(12):
        spec = SketchSpec(d=12, K=32, m=1024, seed=seed)
        result = alignment({name: sketch(spec, *d) for name, d in data.items()}, kind="mean")
        for j, name in enumerate(result.names[1:], start=1):
            z = (float(result.A[0, j]) - exact[name]) / float(result.stderr_projection[0, j])
            assert abs(z) <= 5, (seed, name, z)
            zs.append(z)
    spread = float(torch.tensor(zs).std())
    assert 0.6 <= spread <= 1.5, spread
