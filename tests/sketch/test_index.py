"""SignatureIndex (issue 21.1): query top-k against the exact kernel identity and the dense
mean gradient, agreement with rank_sources, signatures of single prompts, persistence and
its failure modes, merges."""
from __future__ import annotations

import math

import pytest
import torch

from fisherfast.sketch import SignatureIndex, SketchSpec, SketchState, alignment, rank_sources
from test_alignment import errors, kernel, labelled_task, mean_gradient, sketch

SPEC = SketchSpec(d=12, K=32, m=2048, seed=1)
THETAS = {"t": 0.0, "near": 0.1, "mid": 0.45, "far": 0.8, "farther": 1.2, "away": 1.5}


@pytest.fixture(scope="module")
def domains():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 12, generator=g, dtype=torch.float64) / 2
    data = {name: labelled_task(theta, W, 200, g) for name, theta in THETAS.items()}
    return data, {name: sketch(SPEC, *d) for name, d in data.items()}


def build(states, **kwargs) -> SignatureIndex:
    index = SignatureIndex(SPEC, **kwargs)
    for name, state in states.items():
        if name != "t":
            index.add(name, state)
    return index


def test_query_matches_the_exact_formulas(domains):
    """A, S_a, S_e against the kernel identity and G against the dense mean gradients, every
    domain, within 4 of the reported standard errors (+1e-3 for the float32 features)."""
    data, states = domains
    index = build(states)
    hits = index.query(states["t"], k=len(index))
    assert [h.name for h in hits][:2] == ["near", "mid"] and [h.rank for h in hits] == list(range(1, 6))
    sets = {name: (a, errors(z, y)) for name, (a, z, y) in data.items()}
    gbar = {name: mean_gradient(*d).flatten() for name, d in data.items()}
    for h in hits:
        for value, se, (pa, pe) in ((h.A, h.A_stderr, (2, 2)), (h.S_a, h.S_a_stderr, (2, 0)),
                                    (h.S_e, h.S_e_stderr, (0, 2))):
            exact = kernel(sets["t"], sets[h.name], pa, pe) / math.sqrt(
                kernel(sets["t"], sets["t"], pa, pe) * kernel(sets[h.name], sets[h.name], pa, pe))
            assert abs(value - exact) <= 4 * se + 1e-3, (h.name, pa, pe, value, exact, se)
        exact_G = float(gbar["t"] @ gbar[h.name] / (gbar["t"].norm() * gbar[h.name].norm()))
        assert abs(h.G - exact_G) <= 4 * h.G_stderr + 1e-3, (h.name, h.G, exact_G, h.G_stderr)
        assert math.isclose(h.rho, h.A / (h.S_a * h.S_e), rel_tol=1e-9)


def test_query_equals_rank_sources_and_top_k(domains):
    """The index stores μ and Var μ in float32: its scores are rank_sources' to float32 rounding
    (relative 1e-6 on μ; the cosines and error bars to 1e-5)."""
    _, states = domains
    index = build(states)
    want = rank_sources(states["t"], {n: s for n, s in states.items() if n != "t"})
    got = index.query(states["t"], k=3)
    assert [h.name for h in got] == [w.name for w in want[:3]]
    for h, w in zip(got, want):
        for field in ("A", "A_stderr", "S_a", "S_a_stderr", "S_e", "S_e_stderr", "rho", "rho_stderr", "G",
                      "G_stderr"):
            assert getattr(h, field) == pytest.approx(getattr(w, field), rel=1e-4, abs=1e-5), field
        assert h.count == w.count == 200
    scores = index.scores(states["t"])
    assert [index.names[j] for j in scores.argsort(descending=True)[:3]] == [h.name for h in got]


def test_single_prompt_and_bare_signatures(domains):
    """A one-sample target (a verbalizer prompt: n = 1, no sampling variance) and domains added as
    bare joint signatures: cosines of the signatures exactly (float32), ± the projection jackknife."""
    data, states = domains
    a, z, y = data["near"]
    one = sketch(SPEC, a[:1], z[:1], y[:1])
    index = build(states)
    hits = index.query(one, k=5)
    mu_t = one.signature().double()
    for h in hits:
        mu = states[h.name].signature().double()
        assert h.A == pytest.approx(float(mu_t @ mu / (mu_t.norm() * mu.norm())), rel=1e-5)
        assert h.A_stderr > 0 and math.isfinite(h.S_a) and math.isfinite(h.G) and math.isfinite(h.rho)
    bare = SignatureIndex(SPEC)
    for name in ("near", "far"):
        bare.add(name, states[name].signature())
    hits = bare.query(states["t"].signature(), k=2)
    assert [h.name for h in hits] == ["near", "far"] and math.isnan(hits[0].S_a) and hits[0].count == 0
    want = rank_sources(states["t"], {"near": states["near"]})[0]
    assert hits[0].A == pytest.approx(want.A, rel=1e-5)
    projection = alignment([states["t"].signature(), states["near"].signature()]).stderr[0, 1]
    assert hits[0].A_stderr == pytest.approx(float(projection), rel=1e-4)


def test_zero_fisher_domain_ranks_last_and_bad_queries(domains):
    _, states = domains
    index = build(states)
    certain = torch.full((10, 32), float("-inf"))
    certain[:, 3] = 0.0
    zero = sketch(SPEC, torch.randn(10, 12), certain, torch.full((10,), 3))
    index.add("zero", zero)
    hits = index.query(states["t"], k=len(index))
    assert hits[-1].name == "zero" and math.isnan(hits[-1].A) and hits[-1].undefined
    with pytest.raises(ValueError, match="target's joint signature is zero"):
        index.query(zero)
    with pytest.raises(ValueError, match="k: expected an int ≥ 1"):
        index.query(states["t"], k=0)
    with pytest.raises(ValueError, match="already holds"):
        index.add("near", states["near"])
    with pytest.raises(ValueError, match="sketched under"):
        index.add("other", SketchState(SketchSpec(d=12, K=32, m=2048, seed=2), 1))
    with pytest.raises(ValueError, match="shape \\(m = 2048,\\)"):
        index.add("short", torch.ones(5))
    with pytest.raises(ValueError, match="name"):
        index.add(" padded", states["near"])
    broken = SketchState(SPEC, 3, {k: v.clone() for k, v in states["near"].sums.items()}, states["near"].sumsqs)
    broken.sums["error"][0] = math.nan  # a NaN row would read as a kind the domain lacks
    with pytest.raises(ValueError, match="NaN or Inf"):
        index.add("broken", broken)
    assert "broken" not in index.names
    with pytest.raises(ValueError, match="empty"):
        SignatureIndex(SPEC).query(states["t"])


def test_save_load_merge(domains, tmp_path):
    _, states = domains
    index = build(states)
    path = tmp_path / "index.safetensors"
    index.save(path)
    loaded = SignatureIndex.load(path, spec=SPEC)
    assert loaded.names == index.names and loaded.counts == index.counts
    for key, t in index.matrices().items():
        assert torch.equal(loaded.matrices()[key], t)
    assert [h.A for h in loaded.query(states["t"], k=5)] == [h.A for h in index.query(states["t"], k=5)]
    with pytest.raises(ValueError, match="expected SketchSpec"):
        SignatureIndex.load(path, spec=SketchSpec(d=12, K=32, m=2048, seed=9))
    with pytest.raises(FileNotFoundError):
        SignatureIndex.load(tmp_path / "absent.safetensors")
    states["t"].save(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match="not a fisherfast.sketch.index"):
        SignatureIndex.load(tmp_path / "state.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for change, match in ((dict(meta={**meta, "version": "2"}), "version"),
                          (dict(meta={**meta, "names": "[1"}), "corrupted"),
                          (dict(meta={**meta, "names": '["a", "a", "b", "c", "d"]'}), "repeated"),
                          (dict(tensors={**tensors, "count": tensors["count"][:2]}), "corrupted"),
                          (dict(tensors={**tensors, "mu.joint": tensors["mu.joint"].double()}), "corrupted")):
        save_file(change.get("tensors", tensors), tmp_path / "bad.safetensors", metadata=change.get("meta", meta))
        with pytest.raises(ValueError, match=match):
            SignatureIndex.load(tmp_path / "bad.safetensors")
    first, second = SignatureIndex(SPEC), SignatureIndex(SPEC)
    for name in ("near", "mid"):
        first.add(name, states[name])
    for name in ("far", "farther", "away"):
        second.add(name, states[name])
    merged = first + second
    assert merged.names == ["near", "mid", "far", "farther", "away"]
    assert [h.A for h in merged.query(states["t"], k=5)] == [h.A for h in index.query(states["t"], k=5)]
    with pytest.raises(ValueError, match="both indexes hold"):
        merged.merge(first)
    with pytest.raises(ValueError, match="variances"):
        first.merge(SignatureIndex(SPEC, variances=False))
    small = build(states, variances=False)
    assert small.nbytes == index.nbytes // 2
    hits = small.query(states["t"], k=2)
    assert hits[0].A == pytest.approx(index.query(states["t"], k=1)[0].A, rel=1e-5)


def test_each_domain_keeps_its_own_scores(domains, tmp_path):
    """Adding a bare signature or a state without the first moment (a version-1 file) changes
    nothing for the other domains: every score and error bar is as in an index without it (same
    float32 rows, so equal to float64 round-off), also after save/load; the new domain alone lacks
    what it does not hold (S_a, S_e, ρ, G and the sampling part of its error bar; or G)."""
    _, states = domains
    full = {n: states[n] for n in ("near", "mid", "far")}
    before = {h.name: h for h in build(full).query(states["t"], k=3)}
    index = build(full)
    index.add("sig", states["farther"].signature())
    index.add("old", states["away"].without_mean())
    path = tmp_path / "mixed.safetensors"
    index.save(path)
    for idx in (index, SignatureIndex.load(path)):
        got = {h.name: h for h in idx.query(states["t"], k=5)}
        assert sorted(got) == ["far", "mid", "near", "old", "sig"]
        fields = ("A", "A_stderr", "S_a", "S_a_stderr", "S_e", "S_e_stderr", "rho", "rho_stderr", "G", "G_stderr")
        for name, want in before.items():
            for field in fields:
                assert getattr(got[name], field) == pytest.approx(getattr(want, field), rel=1e-9), (name, field)
        sig = got["sig"]
        assert math.isfinite(sig.A) and all(math.isnan(getattr(sig, f)) for f in fields[2:])
        projection = alignment([states["t"].signature(), states["farther"].signature()]).stderr[0, 1]
        assert sig.A_stderr == pytest.approx(float(projection), rel=1e-4)  # projection part only
        old = got["old"]
        assert math.isnan(old.G) and math.isnan(old.G_stderr)
        want = rank_sources(states["t"].without_mean(), {"away": states["away"].without_mean()})[0]
        for field in fields[:8]:
            assert getattr(old, field) == pytest.approx(getattr(want, field), rel=1e-4, abs=1e-5), field
        assert idx.kinds("sig") == ("joint",) and not idx.has_variances("sig")
        assert idx.kinds("old") == ("joint", "activation", "error") and idx.has_variances("old")
        assert idx.kinds("near") == ("joint", "activation", "error", "mean") and idx.has_variances("near")


def test_rank_sources_gives_g_per_candidate(domains):
    """One candidate without the first moment leaves the others' G as without it."""
    _, states = domains
    alone = rank_sources(states["t"], {"near": states["near"]})[0]
    mixed = {s.name: s for s in rank_sources(states["t"], {"near": states["near"],
                                                           "old": states["far"].without_mean()})}
    assert mixed["near"].G == pytest.approx(alone.G, rel=1e-12) and math.isfinite(alone.G)
    assert mixed["near"].G_stderr == pytest.approx(alone.G_stderr, rel=1e-12)
    assert math.isnan(mixed["old"].G) and math.isfinite(mixed["old"].S_a)
