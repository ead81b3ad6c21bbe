"""Study metrics on cases with known answers."""

import pytest
import torch

import growkern
from growkern import GPT, GPTConfig, metrics, plan_growth, widen_


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
        kl = metrics.kl_divergence(before, m(x)[0])
        assert (kl > 1e-3) if positive else (abs(kl) < 1e-12)


def test_update_rms():
    a = {"w": torch.ones(4)}
    assert metrics.update_rms(a, {"w": torch.full((4,), 1.5)}) == pytest.approx(0.5)
    assert metrics.update_rms(a, a) == 0


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
