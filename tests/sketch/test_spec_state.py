"""SketchSpec, SketchState and FisherSketcher: determinism, exact merges,
persistence and its failure modes, standard errors, the true-Fisher sampler
(docs/design.md §7)."""
from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch

from fisherfast.ops import SRHTPlan
from fisherfast.sketch import FisherSketcher, SketchSpec, SketchState, sketch_features


def batch(n, d, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    W = torch.randn(K, d, generator=g) / math.sqrt(d)
    return a, W, torch.randint(0, K, (n,), generator=g)


def sketch(spec, a, z, y):
    sk = FisherSketcher(spec)
    sk.update(a, logits=z, y=y)
    return sk.state


def test_spec_fixes_four_independent_plans():
    spec = SketchSpec(d=10, K=30, m=64, seed=3)
    assert spec == SketchSpec(10, 30, 64, 3) and hash(spec) == hash(SketchSpec(10, 30, 64, 3))
    ra, sa, re, se = spec.plans()
    assert spec.plans() is spec.plans()  # cached
    assert (ra.n_in, sa.n_in, re.n_in, se.n_in) == (10, 10, 30, 30) and {p.m for p in spec.plans()} == {64}
    assert len(set(spec.plan_seeds())) == 4 and not torch.equal(ra.signs, sa.signs)
    assert SketchSpec(10, 30, 64, 4).plan_seeds() != spec.plan_seeds()
    assert SketchSpec.from_json(spec.to_json()) == spec
    for bad in (dict(d=0), dict(K=1), dict(m=-1), dict(seed=-1), dict(d=2.5), dict(version=2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SketchSpec(**{**dict(d=10, K=30, m=64, seed=3), **bad})


def test_state_sizes():
    state = SketchState(SketchSpec(d=4096, K=128256))
    assert state.nbytes == 262_144  # 4 kinds × (Σ, Σ²) × 8 B × 4096
    assert SketchState(SketchSpec(d=4096, K=128256), mean=False).nbytes == 196_608
    state.count = 1
    sig = state.signature()
    assert sig.dtype == torch.float32 and sig.numel() * sig.element_size() == 16_384


def test_sketcher_matches_per_sample_features_and_head_weights():
    spec = SketchSpec(d=12, K=40, m=256, seed=1)
    a, W, y = batch(30, 12, 40)
    state = sketch(spec, a, a @ W.T, y)
    psi = sketch_features(a, (torch.softmax(a @ W.T, -1), y), spec)
    e = torch.softmax(a @ W.T, -1)
    e[torch.arange(30), y] -= 1
    psi_explicit = sketch_features(a, e, spec)
    assert state.count == 30
    for kind in ("joint", "activation", "error"):
        # float32 features: errors relative to the largest entry (sums cancel towards 0)
        close = lambda x, ref: torch.testing.assert_close(x, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))  # noqa: E731
        close(state.sums[kind], psi[kind].sum(0))
        close(state.sumsqs[kind], psi[kind].square().sum(0))
        close(psi_explicit[kind], psi[kind])
        # stderr is the textbook standard error of the mean of the per-sample features
        torch.testing.assert_close(state.stderr(kind), psi[kind].std(0) / math.sqrt(30), rtol=1e-4, atol=1e-12)
    sk = FisherSketcher(spec)
    for rows in (slice(0, 7), slice(7, 30)):
        sk.update(a[rows], W=W, y=y[rows])
    ref = state.as_tensor()
    torch.testing.assert_close(sk.state.as_tensor(), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


def test_merge_equals_one_pass_in_any_order():
    spec = SketchSpec(d=8, K=20, m=128)
    a, W, y = batch(60, 8, 20, seed=2)
    z = a @ W.T
    whole = sketch(spec, a, z, y)
    shards = [sketch(spec, a[r], z[r], y[r]) for r in (slice(0, 13), slice(13, 41), slice(41, 60))]
    for merged in (shards[0] + shards[1] + shards[2], shards[2].merge(shards[0].merge(shards[1]))):
        assert merged.count == 60 and merged.spec == spec
        torch.testing.assert_close(merged.as_tensor(), whole.as_tensor(), rtol=1e-12, atol=1e-12)
    restored = SketchState.from_tensor(spec, 60, whole.as_tensor())
    assert torch.equal(restored.as_tensor(), whole.as_tensor())
    with pytest.raises(ValueError, match="different specs"):
        whole.merge(sketch(SketchSpec(d=8, K=20, m=128, seed=1), a, z, y))
    with pytest.raises(TypeError, match="SketchState"):
        whole.merge(whole.as_tensor())


def test_save_load_roundtrip_and_failures(tmp_path):
    spec = SketchSpec(d=8, K=20, m=64, seed=5)
    a, W, y = batch(25, 8, 20)
    state = sketch(spec, a, a @ W.T, y)
    path = tmp_path / "s.safetensors"
    state.save(path)
    loaded = SketchState.load(path, spec=spec)
    assert loaded.spec == spec and loaded.count == 25 and torch.equal(loaded.as_tensor(), state.as_tensor())
    with pytest.raises(ValueError, match="sketched under"):
        SketchState.load(path, spec=SketchSpec(d=8, K=20, m=64, seed=6))
    with pytest.raises(FileNotFoundError):
        SketchState.load(tmp_path / "absent.safetensors")

    from safetensors.torch import save_file

    tensors = {f"{p}.{k}": torch.zeros(64, dtype=torch.float64) for p in ("sum", "sumsq")
               for k in ("joint", "activation", "error")}
    meta = {"format": "fisherfast.sketch.state", "version": "1", "spec": spec.to_json(), "count": "3"}
    # a version-1 file (before the first moment) still loads, without the "mean" kind
    save_file(tensors, tmp_path / "v1.safetensors", metadata=meta)
    v1 = SketchState.load(tmp_path / "v1.safetensors", spec=spec)
    assert v1.count == 3 and not v1.has_mean and v1.kinds == ("joint", "activation", "error")
    with pytest.raises(ValueError, match="no first moment"):
        v1.signature("mean")
    with pytest.raises(ValueError, match="with the first moment and one without"):
        state.merge(v1)
    assert state.without_mean().merge(v1).count == 28
    v1.save(tmp_path / "v1-again.safetensors")  # written as version 2, still without the first moment
    assert not SketchState.load(tmp_path / "v1-again.safetensors").has_mean
    for change, message in ((dict(version="3"), "version"), (dict(format="other"), "not a fisherfast"),
                            (dict(spec="{"), "corrupted"), (dict(count="x"), "corrupted")):
        save_file(tensors, tmp_path / "bad.safetensors", metadata={**meta, **change})
        with pytest.raises(ValueError, match=message):
            SketchState.load(tmp_path / "bad.safetensors")
    save_file({**tensors, "sum.joint": torch.zeros(63, dtype=torch.float64)}, tmp_path / "bad.safetensors",
              metadata=meta)
    with pytest.raises(ValueError, match="corrupted"):
        SketchState.load(tmp_path / "bad.safetensors")
    mean = {"sum.mean": torch.zeros(64, dtype=torch.float64), "sumsq.mean": torch.zeros(64, dtype=torch.float64)}
    save_file({**tensors, **mean}, tmp_path / "bad.safetensors", metadata=meta)  # version 1 has no first moment
    with pytest.raises(ValueError, match="corrupted"):
        SketchState.load(tmp_path / "bad.safetensors")
    save_file({**tensors, "sum.mean": mean["sum.mean"]}, tmp_path / "bad.safetensors", metadata={**meta, "version": "2"})
    with pytest.raises(ValueError, match="corrupted"):
        SketchState.load(tmp_path / "bad.safetensors")
    raw = bytearray(path.read_bytes())
    (tmp_path / "trunc.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    for name in ("trunc.safetensors", "junk.safetensors"):
        with pytest.raises(ValueError, match="not a readable safetensors"):
            SketchState.load(tmp_path / name)


def test_sampled_labels_sketch_the_true_fisher():
    # One input repeated: E_{y∼p}[(r·e)(s·e)] = rᵀ (diag p − p pᵀ) s, computed densely.
    spec = SketchSpec(d=3, K=6, m=32, seed=2)
    n = 20_000
    a = torch.randn(1, 3).expand(n, 3).contiguous()
    z = torch.tensor([[1.0, 0.5, -0.3, 2.0, 0.0, -1.0]]).expand(n, 6).contiguous()
    sk = FisherSketcher(spec, generator_seed=7)
    sk.update(a, logits=z, sample=True)
    state = sk.state
    _, _, re, se = spec.plans()

    def dense(plan: SRHTPlan) -> torch.Tensor:
        H = torch.from_numpy(scipy.linalg.hadamard(plan.N)).double()
        return (plan.signs.double()[plan.idx // plan.N] * H[plan.idx % plan.N])[:, : plan.n_in]

    p = torch.softmax(z[0].double(), -1)
    F = torch.diag(p) - torch.outer(p, p)
    expected = ((dense(re) @ F) * dense(se)).sum(1) / math.sqrt(spec.m)
    # within 4.5 standard errors (+ float32 rounding, for features whose value does not depend on y)
    assert bool(((state.sums["error"] / n - expected).abs() <= 4.5 * state.stderr("error") + 1e-6).all())
    again = FisherSketcher(spec, generator_seed=7)
    again.update(a, logits=z, sample=True)
    assert torch.equal(again.state.as_tensor(), state.as_tensor())


def test_sketcher_bad_inputs():
    spec = SketchSpec(d=4, K=6, m=8)
    sk = FisherSketcher(spec)
    a, z, y = torch.randn(3, 4), torch.randn(3, 6), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="d = 4"):
        sk.update(torch.randn(3, 5), logits=z, y=y)
    with pytest.raises(ValueError, match="K = 6"):
        sk.update(a, logits=torch.randn(3, 7), y=y)
    with pytest.raises(ValueError, match="not both"):
        sk.update(a, logits=z, y=y, sample=True)
    with pytest.raises(ValueError, match="not both"):
        sk.update(a, logits=z)
    with pytest.raises(TypeError, match="SketchSpec"):
        FisherSketcher((4, 6))
    assert sk.count == 0
    with pytest.raises(ValueError, match="0 samples"):
        sk.state.signature()
    with pytest.raises(ValueError, match="kind"):
        SketchState(spec).signature("weights")


def test_sketcher_rejects_non_finite_rows_and_keeps_its_state():
    """Review: one NaN activation or logit row was accepted and made every later
    sum of the state NaN (a whole corpus sketch lost to one bad row)."""
    spec = SketchSpec(d=8, K=16, m=32)
    g = torch.Generator().manual_seed(0)
    W, a, y = torch.randn(16, 8, generator=g), torch.randn(3, 8, generator=g), torch.tensor([1, 2, 3])
    sketcher = FisherSketcher(spec)
    sketcher.update(a, W=W, y=y)
    before = sketcher.state
    bad = a.clone()
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match="a: expected finite values, got NaN or Inf"):
        sketcher.update(bad, W=W, y=y)
    logits = a @ W.T
    logits[0, 0] = float("inf")
    with pytest.raises(ValueError, match="logits contains NaN or \\+inf"):
        sketcher.update(a, logits=logits, y=y)
    logits[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits contains NaN or \\+inf"):
        sketcher.update(a, logits=logits, y=y)
    logits = a @ W.T
    logits[2] = float("-inf")
    with pytest.raises(ValueError, match="row 2 is −inf everywhere"):
        sketcher.update(a, logits=logits, y=y)
    logits = a @ W.T
    logits[1, 2] = float("-inf")
    with pytest.raises(ValueError, match="y\\[1\\] = 2 is a masked class"):
        sketcher.update(a, logits=logits, y=y)
    after = sketcher.state
    assert after.count == before.count == 3
    for kind in before.sums:
        assert torch.equal(after.sums[kind], before.sums[kind])
        assert bool(torch.isfinite(after.sums[kind]).all())
    # the state still equals the per-sample features of the good rows (independent oracle)
    p = torch.softmax((a @ W.T).double(), -1).float()
    want = sketch_features(a, (p, y), spec)
    for kind in before.sums:
        torch.testing.assert_close(after.sums[kind], want[kind].sum(0), rtol=1e-5, atol=1e-6)


def dense_plan(plan: SRHTPlan) -> torch.Tensor:
    """(m, n_in) float64: the SRHT rows ±1 written out (H_N from scipy, independent of the fwht op)."""
    H = torch.from_numpy(scipy.linalg.hadamard(plan.N)).double()
    return (plan.signs.double()[plan.idx // plan.N] * H[plan.idx % plan.N])[:, : plan.n_in]


def dense_features(spec: SketchSpec, a: torch.Tensor, e: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample ψ of docs/design.md §7 in float64 from dense SRHT rows and explicit errors e (B, K)."""
    Ra, Sa, Re, Se = (dense_plan(p) for p in spec.plans())
    a, e = a.double(), e.double()
    act = (a @ Ra.T) * (a @ Sa.T) / math.sqrt(spec.m)
    err = (e @ Re.T) * (e @ Se.T) / math.sqrt(spec.m)
    return {"joint": act * err * math.sqrt(spec.m), "activation": act, "error": err}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_minus_inf_logits_are_masks(backend):
    """Issue 18.5: −inf logits are probability-zero classes. The state equals the dense
    float64 features of e = p − e_y with p = 0 on the masked classes, for given labels and
    for y ∼ p (drawn from the sketcher's generator, never on a masked class).
    Error model: the op computes the features in float32; each feature is a product of four
    SRHT outputs with relative error ≲ log₂N·2⁻²⁴ each, so sums are within ~1e-5 of the
    largest |Σψ| (the float64 sums add no error at this size)."""
    spec = SketchSpec(d=12, K=40, m=128, seed=4)
    a, W, _ = batch(50, 12, 40, seed=3)
    z = a @ W.T
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(50, 40, generator=g) < 0.6
    mask[:, 0] = False  # every row keeps a class
    z = z.masked_fill(mask, float("-inf"))
    p = torch.softmax(z.double(), -1)
    assert bool((p[mask] == 0).all())
    allowed = (~mask).float()
    y = torch.multinomial(allowed, 1, generator=g).flatten()

    def check(state, labels):
        e = p.clone()
        e[torch.arange(50), labels] -= 1
        want = dense_features(spec, a, e)
        for kind in ("joint", "activation", "error"):
            ref = want[kind].sum(0)
            torch.testing.assert_close(state.sums[kind], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))

    sk = FisherSketcher(spec, backend=backend)
    sk.update(a, logits=z, y=y)
    check(sk.state, y)
    seed = 11
    u = torch.rand(50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    c = torch.cumsum(p, -1)  # inverse CDF in float64, as an independent draw of the same y
    y_drawn = (c <= u[:, None] * c[:, -1:]).sum(-1)
    assert not bool(mask[torch.arange(50), y_drawn].any())
    sk = FisherSketcher(spec, generator_seed=seed, backend=backend)
    sk.update(a, logits=z, sample=True)
    check(sk.state, y_drawn)
