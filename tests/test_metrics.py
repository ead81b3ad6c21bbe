"""Study metrics on cases with known answers."""

import pytest
import torch

import growkern
from growkern import GPT, GPTConfig, plan_growth, widen_
from growkern.growth.probe import kl_divergence
from growkern.studies import metrics


def small_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=24,
                         norm="rmsnorm")).double()


def steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 37, (4, 13), generator=g)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("strategy,escapes", [("exact_copy", False), ("perturb", True), ("structured", True)])
def test_escape_fraction(strategy, escapes):
    m = small_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    steps(m, opt, 2)
    plan = plan_growth(m.config, factor=2, strategy=strategy, seed=1)
    widen_(m, opt, plan=plan)
    steps(m, opt, 4, seed=1)
    esc = metrics.escape_fraction(dict(m.named_parameters()), plan)
    if escapes:
        assert esc > 1e-6
    else:
        assert esc < 1e-6  # copies stay copies in deterministic continuation


def test_kl_zero_for_preserving_and_positive_for_szp():
    x = torch.randint(0, 37, (2, 12))
    for strategy, positive in (("exact_copy", False), ("szp", True)):
        m = small_model()
        m.eval()
        before = m(x)[0]
        widen_(m, factor=2, strategy=strategy)
        kl = kl_divergence(before, m(x)[0])
        assert (kl > 1e-3) if positive else (abs(kl) < 1e-12)


def test_update_rms():
    # theta_0 has RMS 1 here, so the absolute RMS and the old relative norm agree (0.5)
    a = {"w": torch.ones(4)}
    assert metrics.update_rms(a, {"w": torch.full((4,), 1.5)}) == pytest.approx(0.5)
    assert metrics.update_rms(a, a) == 0


def test_update_rms_absolute_relative_and_global_norm():
    before = {"a": torch.full((2, 2), 2.0), "b": torch.zeros(4), "c": torch.ones(8)}
    after = {"a": torch.full((2, 2), 3.0),  # dW = 1 everywhere, W_0 = 2: ratio 1/2
             "b": torch.full((4,), 0.5),  # W_0 = 0: left out of the relative RMS
             "c": torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0])}  # ||dW|| = 4, ||W_0|| = sqrt(8)
    # true RMS: sqrt((4 * 1 + 4 * 0.25 + 16) / 16 entries)
    assert metrics.update_rms(before, after) == pytest.approx((21 / 16) ** 0.5)
    # per-tensor RMS ratios averaged over tensors with W_0 != 0: (1/2 + 4/sqrt(8)) / 2
    assert metrics.relative_update_rms(before, after) == pytest.approx((0.5 + 4 / 8 ** 0.5) / 2)
    # the old definition, global: sqrt(21) / sqrt(16 + 0 + 8)
    assert metrics.relative_update_norm(before, after) == pytest.approx((21 / 24) ** 0.5)
    # absolute: scaling both states scales the RMS, not the relative measures
    b2 = {k: 3 * v for k, v in before.items()}
    a2 = {k: 3 * v for k, v in after.items()}
    assert metrics.update_rms(b2, a2) == pytest.approx(3 * metrics.update_rms(before, after))
    assert metrics.relative_update_rms(b2, a2) == pytest.approx(metrics.relative_update_rms(before, after))
    for f in (metrics.update_rms, metrics.relative_update_rms, metrics.relative_update_norm):
        assert f(before, before) == 0
    assert metrics.relative_update_rms({"b": torch.zeros(3)}, {"b": torch.ones(3)}) == 0


def _grown_and_continued(strategy, lags=(1, 4), **options):
    """A float64 RMSNorm GPT trained 2 AdamW steps, grown x2, then continued
    deterministically; theta_0 right after growth and theta_t at each lag."""
    m = small_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    steps(m, opt, 2)
    plan = plan_growth(m.config, factor=2, strategy=strategy, seed=1, **options)
    widen_(m, opt, plan=plan)
    theta0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    out, done = {}, 0
    for lag in lags:
        steps(m, opt, lag - done, seed=lag)
        done = lag
        out[lag] = {n: p.detach().clone() for n, p in m.named_parameters()}
    return plan, theta0, out


def test_update_escape_zero_for_exact_copy_positive_for_non_preserving_perturb():
    plan, theta0, at = _grown_and_continued("exact_copy")
    assert metrics.escape_fraction(theta0, plan) == 0
    for lag, theta in at.items():
        assert metrics.update_rms(theta0, theta) > 1e-4  # it did train
        assert metrics.update_escape(theta0, theta, plan) < 1e-20  # clones got identical updates
    plan, theta0, at = _grown_and_continued("perturb", preserving=False)
    for lag, theta in at.items():
        assert metrics.update_escape(theta0, theta, plan) > 1e-6
    assert metrics.update_escape(theta0, theta0, plan) == 0  # no update


def test_update_escape_known_tensor_and_fresh_units():
    # one 2-vector grown to 3: units 0 and 2 copy source 0, unit 1 is fresh
    from types import SimpleNamespace as NS
    tp = NS(rows=NS(src=torch.tensor([0, -1, 0])), cols=None, transposed=False)
    plan = NS(tensors={"g": tp})
    w0 = {"g": torch.zeros(3)}
    # copies moved apart (+1, -1 around mean 0) and the fresh unit moved by 2:
    # all of the update is outside the subspace
    assert metrics.update_escape(w0, {"g": torch.tensor([1.0, 2.0, -1.0])}, plan) == pytest.approx(1.0)
    # copies moved together: inside
    assert metrics.update_escape(w0, {"g": torch.tensor([3.0, 0.0, 3.0])}, plan) == 0
    # half and half: dW = (2, 0, 0) = (1, 0, 1) inside + (1, 0, -1) outside
    assert metrics.update_escape(w0, {"g": torch.tensor([2.0, 0.0, 0.0])}, plan) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not in the growth plan"):
        metrics.update_escape({"h": torch.zeros(3)}, {"h": torch.ones(3)}, plan)


def test_escape_fraction_reads_transposed_parameters_through_their_transpose():
    from types import SimpleNamespace as NS
    # (out, in) orientation: rows 0, 1 copy source 0; cols identity. Stored transposed (in, out).
    tp = NS(rows=NS(src=torch.tensor([0, 0])), cols=NS(src=torch.tensor([0, 1, 2])), transposed=True)
    plan = NS(tensors={"w": tp})
    w = torch.randn(2, 3).double()
    w[1] = w[0]  # copies equal in (out, in) orientation
    stored = w.t().contiguous()  # (3, 2)
    assert metrics.escape_fraction({"w": stored}, plan) == pytest.approx(0, abs=1e-30)
    assert metrics.update_escape({"w": 0 * stored}, {"w": stored}, plan) == pytest.approx(0, abs=1e-30)


def test_auc_spearman_speedup():
    assert metrics.area_under_curve([0, 10], [4.0, 2.0]) == pytest.approx(3.0)
    assert metrics.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)
    flops, losses = [1.0, 2.0, 3.0, 4.0], [5.0, 4.0, 3.0, 2.5]
    # a run against itself: speedup 1
    assert metrics.speedup(flops, losses, 4.0, 2.5) == (pytest.approx(1.0), True)
    assert metrics.compute_to_reach(flops, losses, 3.5) == pytest.approx(2.5)
    s, exact = metrics.speedup(flops, losses, 2.0, 1.0)
    assert not exact and s == pytest.approx(2.0)
