"""Growth engine: preservation, the moment rule, strategies, optimizer and schedule."""
import copy
import itertools

import pytest
import torch

import growkern
from growkern import GPT, GPTConfig, plan_growth, widen_

VOCAB = 53  # odd on purpose


def make(seed=0, dtype=torch.float64, **kw):
    cfg = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=24)
    cfg.update(kw)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**cfg)).to(dtype)


def batch(seed=1, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


def trained(model, steps=2, opt_cls=torch.optim.AdamW, **opt_kw):
    opt = opt_cls(model.parameters(), lr=1e-2, **opt_kw)
    for s in range(steps):
        x = batch(seed=10 + s)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0]


# --- zero-step preservation over the grid -----------------------------------------

GRID = list(itertools.product(
    ["layernorm", "rmsnorm"], ["gelu", "swiglu"], ["learned", "rope"], [True, False], [2, 3, 1.5]))


@pytest.mark.parametrize("norm,mlp,pos,tie,factor", GRID)
@pytest.mark.parametrize("strategy", ["exact_copy", "perturb", "asym_reset", "structured"])
def test_preservation_grid(norm, mlp, pos, tie, factor, strategy):
    # 4 query heads over 2 kv heads (GQA), head_dim 4: factor 1.5 gives d_model 24, 6 heads
    m = make(norm=norm, mlp=mlp, pos=pos, tie_embeddings=tie, bias=(norm == "layernorm"), n_head=4, n_kv_head=2)
    opt = trained(m)
    x = batch()
    before = logits(m, x)
    plan = plan_growth(m.config, factor=factor, strategy=strategy, seed=3)
    # the claim itself: LayerNorm is exact only when the residual stream is tiled whole
    padded = not plan.dims["d_model"].exact_clone
    assert plan.exact == (norm == "rmsnorm" or not padded)
    rep = widen_(m, opt, plan=plan, probe_batch=x)
    after = logits(m, x)
    assert m.config.d_model == round(16 * factor) and m.config.d_ff == round(24 * factor)
    assert m.config.n_head == round(4 * factor) and m.config.n_kv_head == round(2 * factor)
    if plan.exact:
        assert (after - before).abs().max() <= 1e-5 * before.abs().max()
        assert rep.preservation["kl_small_wide"] < 1e-12
    else:
        assert (after - before).abs().max() > 1e-6


@pytest.mark.parametrize("targets", [
    dict(d_ff=40),                      # d_ff only
    dict(d_model=48),                   # d_model with heads at fixed head_dim
    dict(d_model=32, n_head=2),         # head_dim growth (learned positions)
    dict(d_model=24, n_head=2),         # non-integer head_dim growth
    dict(factor=2, d_ff=30),            # explicit override of one dim
])
def test_preservation_explicit_targets(targets):
    m = make(norm="rmsnorm")
    opt = trained(m)
    x = batch()
    before = logits(m, x)
    widen_(m, opt, strategy="exact_copy", **targets)
    for k, v in targets.items():
        if k != "factor":
            assert getattr(m.config, k) == v
    assert torch.allclose(logits(m, x), before, rtol=0, atol=1e-10)


def test_float32_tolerance():
    """float32: the wide model sums 2x more terms in other orders; 1e-5 relative holds."""
    m = make(dtype=torch.float32)
    x = batch()
    before = logits(m, x)
    widen_(m, factor=2)
    assert (logits(m, x) - before).abs().max() <= 1e-5 * before.abs().max() * 10


# --- copies stay copies; the moment rule --------------------------------------------

def clone_groups(src):
    groups = {}
    for j, s in enumerate(src.tolist()):
        if s >= 0:
            groups.setdefault(s, []).append(j)
    return [g for g in groups.values() if len(g) > 1]


def assert_copies_identical(model, plan, atol=1e-12):
    for name, p in model.named_parameters():
        tp = plan.tensors[name]
        w = p.detach()
        for g in clone_groups(tp.rows.src):
            for j in g[1:]:
                torch.testing.assert_close(w[j], w[g[0]], rtol=0, atol=atol)
        if tp.cols is not None:
            for g in clone_groups(tp.cols.src):
                for j in g[1:]:
                    torch.testing.assert_close(w[:, j], w[:, g[0]], rtol=0, atol=atol)


@pytest.mark.parametrize("tie", [True, False])
def test_exact_copy_copies_stay_identical_under_adamw(tie):
    m = make(tie_embeddings=tie, bias=True, n_kv_head=1)
    opt = trained(m)
    plan = plan_growth(m.config, factor=2)
    widen_(m, opt, plan=plan)
    trained_more = opt
    for s in range(5):
        x = batch(seed=100 + s)
        _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        trained_more.step()
        trained_more.zero_grad()
    assert_copies_identical(m, plan)


def mapped(plan, name, t, power=1):
    """Apply the plan's moment map to a small tensor (e.g. a gradient or exp_avg)."""
    tp = plan.tensors[name]
    r, c = tp.moment_scales()
    out = t[tp.rows.src] * (r ** power).view(-1, *([1] * (t.dim() - 1)))
    if tp.cols is not None:
        out = out[:, tp.cols.src] * (c ** power)
    return out


@pytest.mark.parametrize("kw", [
    dict(factor=2),
    dict(factor=3, tie_embeddings=False),
    dict(factor=1.5, norm="rmsnorm", mlp="swiglu", n_kv_head=1),
    dict(d_model=32, n_head=2),  # head_dim growth: q rows take sqrt(hd'/hd)
])
def test_moment_rule(kw):
    grow = {k: kw.pop(k) for k in ("factor", "d_model", "n_head") if k in kw}
    m = make(bias=True, **kw)
    opt = trained(m)
    x = batch(seed=7)
    small = copy.deepcopy(m)
    small_opt = torch.optim.AdamW(small.parameters(), lr=1e-2)
    small_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _, loss = small(x[:, :-1], x[:, 1:])
    loss.backward()
    small_grads = {n: p.grad.clone() for n, p in small.named_parameters()}
    small_opt.step()

    plan = plan_growth(m.config, **grow)
    widen_(m, opt, plan=plan)
    _, loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, mapped(plan, n, small_grads[n]), rtol=1e-9, atol=1e-12)
    opt.step()
    small_params = dict(small.named_parameters())
    for n, p in m.named_parameters():
        st, sst = opt.state[p], small_opt.state[small_params[n]]
        torch.testing.assert_close(st["exp_avg"], mapped(plan, n, sst["exp_avg"]), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(st["exp_avg_sq"], mapped(plan, n, sst["exp_avg_sq"], 2),
                                   rtol=1e-9, atol=1e-18)


# --- strategies ---------------------------------------------------------------------

def test_perturb_preserving_breaks_symmetry_and_keeps_function():
    m = make()
    x = batch()
    before = logits(m, x)
    plan = plan_growth(m.config, factor=2, strategy="perturb", noise=0.05, seed=5)
    widen_(m, plan=plan)
    assert (logits(m, x) - before).abs().max() <= 1e-5 * before.abs().max()
    w = m.blocks[0].mlp.down.weight.detach()
    tp = plan.tensors["blocks.0.mlp.down.weight"]
    g = clone_groups(tp.cols.src)[0]
    assert not torch.allclose(w[:, g[0]], w[:, g[1]])
    torch.testing.assert_close(w[:, g[0]] + w[:, g[1]], 2 * w[:, g].mean(1))


def test_perturb_non_preserving_changes_function_and_is_seeded():
    outs = []
    for seed in (1, 1, 2):
        m = make()
        widen_(m, factor=2, strategy="perturb", preserving=False, noise=0.05, seed=seed)
        outs.append(logits(m, batch()))
    before = logits(make(), batch())
    assert not torch.allclose(outs[0], before, atol=1e-6)
    assert torch.equal(outs[0], outs[1])  # same seed, same result
    assert not torch.equal(outs[0], outs[2])


def test_structured_fan_in_orthogonal_and_fan_out_zero():
    # old rows (8) leave room in the 32-dim fan-in space, so orthogonality is possible
    m = make(d_model=32, d_ff=8, n_head=4, norm="rmsnorm")
    x = batch()
    before = logits(m, x)
    old_up = m.blocks[0].mlp.up.weight.detach().clone()
    rep = widen_(m, d_ff=20, strategy="structured", seed=2)
    assert not rep.notes
    assert torch.allclose(logits(m, x), before, atol=1e-10)
    up = m.blocks[0].mlp.up.weight.detach()
    new_rows = up[8:]
    assert torch.equal(up[:8], old_up)
    assert (new_rows @ old_up.T).abs().max() < 1e-10
    old_rms = old_up.pow(2).mean().sqrt()
    torch.testing.assert_close(new_rows.pow(2).mean(1).sqrt(), old_rms.expand(12))
    assert torch.all(m.blocks[0].mlp.down.weight[:, 8:] == 0)


def test_asym_reset_moments():
    m = make()
    opt = trained(m)
    plan = plan_growth(m.config, factor=2, strategy="asym_reset")
    widen_(m, opt, plan=plan)
    st = opt.state[m.blocks[0].mlp.up.weight]["exp_avg"]
    assert st[:24, :16].abs().sum() > 0  # original rows, original columns
    assert torch.all(st[24:] == 0) and torch.all(st[:, 16:] == 0)
    m2 = make()
    opt2 = trained(m2)
    widen_(m2, opt2, factor=2, strategy="asym_reset", zero_all=True)
    assert all(torch.all(s["exp_avg"] == 0) for s in opt2.state.values())


def test_szp_and_scratch():
    m = make()
    opt = trained(m)
    old = m.blocks[0].attn.q_proj.weight.detach().clone()
    rep = widen_(m, opt, factor=2, strategy="szp", shrink=0.5, seed=1, probe_batch=batch())
    assert not rep.exact and rep.preservation["max_abs_dlogits"] > 1e-3
    q = m.blocks[0].attn.q_proj.weight.detach()
    assert (q[:16, :16] - 0.5 * old).std() < 0.03  # shrunk plus init-scale noise
    m2 = make()
    opt2 = trained(m2)
    widen_(m2, opt2, factor=2, strategy="scratch")
    assert all(int(s["step"]) == 0 and torch.all(s["exp_avg"] == 0) for s in opt2.state.values())
    assert abs(m2.blocks[0].mlp.up.weight.std().item() - 0.02) < 0.004


def test_register_strategy():
    @growkern.register_strategy
    class Halve(growkern.Strategy):
        """exact_copy, but new units get double the noise-free weights (for the test)."""
        name = "test_custom"
        preserving = False

    assert "test_custom" in growkern.strategies()
    m = make()
    rep = widen_(m, factor=2, strategy="test_custom")
    assert rep.strategy == "test_custom" and m.config.d_model == 32


def test_plan_is_deterministic_and_printable():
    c = make().config
    a = plan_growth(c, factor=1.5, seed=4)
    b = plan_growth(c, factor=1.5, seed=4)
    d = plan_growth(c, factor=1.5, seed=5)
    assert torch.equal(a.dims["d_ff"].src, b.dims["d_ff"].src)
    assert not torch.equal(a.dims["d_ff"].src, d.dims["d_ff"].src)
    s = a.summary()
    assert "d_model 16->24" in s and "d_ff" in s and "preserving" in s


# --- optimizer and scheduler ----------------------------------------------------------

@pytest.mark.parametrize("opt_cls,kw", [
    (torch.optim.AdamW, {}),
    (torch.optim.AdamW, {"foreach": True}),
    (torch.optim.AdamW, {"fused": True}),
    (torch.optim.Adam, {"amsgrad": True}),
    (torch.optim.SGD, {"momentum": 0.9}),
])
def test_optimizer_step_and_state_dict_round_trip(opt_cls, kw):
    m = make(dtype=torch.float32)
    opt = trained(m, opt_cls=opt_cls, **kw)
    steps = {id(p): st.get("step") for p, st in opt.state.items()}
    widen_(m, opt, factor=2)
    for p, st in opt.state.items():
        for k, v in st.items():
            if k != "step":
                assert v.shape == p.shape, k
        if steps[id(p)] is not None:
            assert float(st["step"]) == float(steps[id(p)])
    x = batch()
    _, loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = opt_cls(m.parameters(), lr=1e-2, **kw)
    opt2.load_state_dict(sd)
    for p in m.parameters():
        for k, v in opt.state[p].items():
            torch.testing.assert_close(opt2.state[p][k], v)


def test_schedule_continue_and_rewarm_survive_state_dict():
    def setup():
        m = make(dtype=torch.float32)
        opt = torch.optim.AdamW(m.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
        for _ in range(5):
            opt.step()
            sched.step()
        return m, opt, sched

    m, opt, sched = setup()
    lr_before = sched.get_last_lr()[0]
    widen_(m, opt, sched, factor=2)
    assert sched.get_last_lr()[0] == lr_before

    ref_m, ref_opt, ref_sched = setup()  # the un-ramped schedule
    m, opt, sched = setup()
    widen_(m, opt, sched, factor=2, schedule="rewarm", rewarm_steps=4)
    lrs, ref = [], []
    for i in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        ref.append(ref_opt.param_groups[0]["lr"])
        opt.step(); sched.step(); ref_opt.step(); ref_sched.step()
        if i == 1:  # save and load into a fresh scheduler mid-ramp
            sd = sched.state_dict()
            fresh = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
            fresh.load_state_dict(sd)
            sched = growkern.schedule.reattach(fresh)
    factors = [a / b for a, b in zip(lrs, ref)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


# --- atomicity ------------------------------------------------------------------------

def snapshot(m, opt, sched):
    return (copy.deepcopy(m.state_dict()), copy.deepcopy(m.config), copy.deepcopy(opt.state_dict()),
            copy.deepcopy(sched.state_dict()))


def assert_same(a, b):
    sd_a, cfg_a, opt_a, sch_a = a
    sd_b, cfg_b, opt_b, sch_b = b
    assert cfg_a == cfg_b and sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for pid, st in opt_a["state"].items():
        for k, v in st.items():
            assert torch.equal(v, opt_b["state"][pid][k])
    assert sch_a == sch_b


class NotAnOptimizer(torch.optim.RMSprop):
    pass


@pytest.mark.parametrize("bad,exc,words", [
    (dict(factor=0.5), ValueError, "factor must be >= 1"),
    (dict(factor=float("nan")), ValueError, "factor"),
    (dict(d_model=8), ValueError, "smaller than the current"),
    (dict(d_model=40, n_head=3), ValueError, "not divisible by n_head"),
    (dict(d_model=36), ValueError, "not a multiple of the current head_dim"),
    (dict(strategy="nope", factor=2), ValueError, "unknown strategy"),
    (dict(strategy="perturb", factor=2, noise=-1), ValueError, "noise"),
    (dict(strategy="perturb", factor=2, bogus=1), ValueError, "no option 'bogus'"),
    (dict(factor=2, schedule="nope"), ValueError, "schedule must be one of"),
    (dict(factor=2, schedule="rewarm"), ValueError, "rewarm_steps"),
    (dict(factor=2, backend="fortran"), ValueError, "unknown backend"),
    (dict(), ValueError, "give a growth factor"),
    (dict(factor=1), ValueError, "factor 1 leaves every width unchanged"),
    (dict(d_model=16, d_ff=24), ValueError, "the targets leave every width unchanged"),
    (dict(factor=2, probe_batch="Once upon a time"), TypeError, "probe_batch: got str"),
    (dict(factor=2, probe_batch=(batch(), "y")), TypeError, r"got tuple of \(Tensor, str\)"),
    (dict(factor=2, probe_batch=batch().float()), TypeError, "dtype torch.float32"),
    (dict(factor=2, probe_batch=batch()[0]), ValueError, r"shape \(12,\)"),
    (dict(factor=2, probe_batch=batch() + VOCAB), ValueError, rf"allowed: \[0, {VOCAB - 1}\]"),
    (dict(factor=2, probe_batch=(batch(), batch()[:, :5])), ValueError, "targets have shape"),
    (dict(factor=2, probe_batch=(batch(), -batch() - 1)), ValueError, "or -100 to ignore"),
    (dict(factor=2, probe_batch=torch.randint(0, VOCAB, (2, 40))), ValueError, "40 tokens; the model has 16"),
])
def test_bad_input_changes_nothing(bad, exc, words):
    m = make(dtype=torch.float32)
    opt = trained(m)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    before = snapshot(m, opt, sched)
    with pytest.raises(exc, match=words):
        widen_(m, opt, sched, **bad)
    assert_same(before, snapshot(m, opt, sched))


def test_model_on_meta_device_is_refused():
    with torch.device("meta"):
        m = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="on the meta device"):
        widen_(m, factor=2)
    assert m.config.d_model == 16 and m.wte.weight.shape == (VOCAB, 16)


def test_rope_head_dim_growth_rejected_unchanged():
    m = make(pos="rope", dtype=torch.float32)
    opt = trained(m)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    before = snapshot(m, opt, sched)
    with pytest.raises(ValueError, match="head_dim growth .* not supported"):
        widen_(m, opt, sched, d_model=32, n_head=2)
    assert_same(before, snapshot(m, opt, sched))


def test_unknown_optimizer_scheduler_and_model_rejected_unchanged():
    m = make(dtype=torch.float32)
    opt = trained(m, opt_cls=NotAnOptimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    before = snapshot(m, opt, sched)
    with pytest.raises(TypeError, match="unsupported optimizer NotAnOptimizer"):
        widen_(m, opt, sched, factor=2)
    assert_same(before, snapshot(m, opt, sched))

    opt = trained(m)
    with pytest.raises(TypeError, match="unsupported scheduler"):
        widen_(m, opt, object(), factor=2)
    other = torch.optim.AdamW(m.parameters())
    with pytest.raises(ValueError, match="must drive the optimizer"):
        widen_(m, opt, torch.optim.lr_scheduler.StepLR(other, 3), factor=2)
    with pytest.raises(TypeError, match=r"does not know how to grow Linear \(torch.nn.modules.linear.Linear\); "
                                        r"known: .*GPT"):
        widen_(torch.nn.Linear(3, 3), factor=2)
    plan = plan_growth(make(d_model=32).config, factor=2)
    with pytest.raises(ValueError, match="plan was made for"):
        widen_(m, opt, plan=plan)
    assert m.config.d_model == 16 and m.wte.weight.shape == (VOCAB, 16)


def test_parameters_keep_identity_and_report():
    m = make(dtype=torch.float32)
    opt = trained(m)
    ids = [id(p) for p in m.parameters()]
    hook_calls = []
    m.blocks[0].mlp.up.weight.register_hook(lambda g: hook_calls.append(g.shape))
    rep = widen_(m, opt, factor=2, probe_batch=batch())
    assert [id(p) for p in m.parameters()] == ids
    assert m.lm_head.weight is m.wte.weight
    assert m.blocks[0].mlp.up.out_features == 48 and m.wte.embedding_dim == 32
    assert rep.params_after > 3 * rep.params_before // 2 and rep.bytes_allocated > 0
    assert rep.dims_before["d_model"] == 16 and rep.dims_after["d_model"] == 32
    assert rep.backend in growkern.backends() and "preservation" in str(rep)
    x = batch()
    _, loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    assert hook_calls == [torch.Size([48, 32])]


def test_growth_that_does_not_fit_fails_up_front(monkeypatch):
    m = make(dtype=torch.float32)
    opt = trained(m)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    before = snapshot(m, opt, sched)
    monkeypatch.setattr(growkern.growth.checks, "free_bytes", lambda dev: 5 * 2**20)
    with pytest.raises(MemoryError, match=r"growth needs \S+ MiB of new state on cpu, 5.00 MiB are free; "
                                          r"nothing was changed"):
        widen_(m, opt, sched, factor=20)
    assert_same(before, snapshot(m, opt, sched))


def test_sizes_are_said_in_a_unit_they_fill():
    from growkern.growth.checks import format_bytes
    assert [format_bytes(n) for n in (812, 5 * 2**20, 2.41 * 2**30, 123.4 * 2**20, 1536)] == \
        ["812 B", "5.00 MiB", "2.41 GiB", "123 MiB", "1.50 KiB"]


def test_head_count_refusal_names_the_heads():
    """n_head=3 of a 4-head model: the refusal is about heads, not the d_model = 3 x
    head_dim it would imply."""
    with pytest.raises(ValueError, match=r"target n_head=3 is fewer heads than the current 4.*n_head >= 4") as e:
        plan_growth(GPTConfig(vocab_size=VOCAB, d_model=64, n_head=4, n_layer=1), n_head=3)
    assert "d_model=48" not in str(e.value)


class UserConfig:
    def __init__(self, vocab_size=11, n_embd=8, n_head=1):
        self.vocab_size, self.n_embd, self.n_head = vocab_size, n_embd, n_head


class UserModels:
    class GPT(torch.nn.Module):
        """A user's model named GPT (as nanoGPT's is), with a layout of its own."""

        def __init__(self, config):
            super().__init__()
            self.config = config
            self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
            self.fc = torch.nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
            self.proj = torch.nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
            self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)

        def forward(self, idx):
            x = self.wte(idx)
            return self.lm_head(x + self.proj(torch.nn.functional.gelu(self.fc(x))))


@pytest.mark.parametrize("registered_by", ["class", "name"])
def test_a_user_class_named_gpt_is_not_growkerns_gpt(registered_by):
    """Without register_adapter, a user's class that shares growkern.GPT's name is
    refused with a TypeError naming it and register_adapter, before anything changes;
    registered by class or by name it grows with its own table, and a bare name never
    takes growkern's own GPT from its adapter."""
    from growkern.growth.adapter import _ADAPTERS, EMBEDDING, LM_HEAD, linear
    torch.manual_seed(0)
    model = UserModels.GPT(UserConfig()).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"does not know how to grow GPT \(test_growth\.UserModels\.GPT; "
                                        r"growkern\.models\.gpt\.GPT is another class of the same name\)"
                                        r".*growkern\.register_adapter"):
        widen_(model, factor=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    adapter = growkern.Adapter(name="user-gpt", classes=(UserModels.GPT,) if registered_by == "class" else ("GPT",),
                               params={r"wte\.weight": EMBEDDING, r"lm_head\.weight": LM_HEAD,
                                       r"fc\.weight": linear("d_ff", "d_model"),
                                       r"proj\.weight": linear("d_model", "d_ff")},
                               config_keys=dict(d_model="n_embd", n_head="n_head", vocab_size="vocab_size"))
    growkern.register_adapter(adapter)
    try:
        assert growkern.adapter_for(model) is adapter
        assert growkern.adapter_for(make()).name == "growkern.GPT"
        x = batch()[:, :4] % 11
        want = model(x)
        widen_(model, factor=2)
        assert model.config.n_embd == 16 and model.fc.weight.shape == (64, 16)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)
    finally:
        _ADAPTERS.remove(adapter)


def test_optimizer_that_does_not_train_exactly_this_model_is_refused_unchanged():
    m = make(dtype=torch.float32)
    opt = trained(m)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    before = snapshot(m, opt, sched)
    params = list(m.parameters())
    other = make(seed=1, dtype=torch.float32)
    for bad, words in [(torch.optim.AdamW(other.parameters()), "not one of the model's"),
                       (torch.optim.AdamW(params[1:]), "does not hold 1 trainable")]:
        with pytest.raises(ValueError, match=words):
            widen_(m, bad, factor=2)
        assert_same(before, snapshot(m, opt, sched))


def _copy_index_loop(src):
    out, seen = [], {}
    for s in src:
        out.append(seen.get(s, 0) if s >= 0 else -1)
        if s >= 0:
            seen[s] = seen.get(s, 0) + 1
    return out


def _antithetic_loop(src):
    sign, idx, partners = [0.0] * len(src), list(range(len(src))), {}
    for j, s in enumerate(src):
        if s >= 0:
            partners.setdefault(s, []).append(j)
    for copies in partners.values():
        for a, b in zip(copies[0::2], copies[1::2]):
            sign[a], sign[b], idx[b] = 1.0, -1.0, a
    return sign, idx


from hypothesis import given, strategies as st  # noqa: E402


@given(st.lists(st.integers(-1, 6), max_size=40))
def test_vectorized_index_maps_equal_their_definitions(src):
    """copy_index and antithetic (torch ops, no Python loop over the indices) give what the
    per-index definitions give: ordinals of copies, +1/-1 pairs sharing one counter."""
    from growkern.growth.maps import copy_index
    from growkern.growth.strategies import antithetic
    t = torch.tensor(src, dtype=torch.long)
    assert copy_index(t).tolist() == _copy_index_loop(src)
    sign, idx = antithetic(t)
    want_sign, want_idx = _antithetic_loop(src)
    assert sign.dtype == torch.float64 and sign.tolist() == want_sign and idx.tolist() == want_idx


@given(st.integers(1, 9), st.integers(0, 9), st.data())
def test_rms_mapped_equals_the_mapped_tensors_rms(r_old, c_old, data):
    """The relative-noise unit (RMS of the mapped, pre-noise entries) computed from the old
    tensor alone, in row chunks, equals the RMS of the mapped tensor itself: for 1-D and
    2-D tensors, transposed views, fresh units and float32 storage."""
    from types import SimpleNamespace
    from growkern.growth import apply
    two_d = c_old > 0

    def axis(old):
        src = data.draw(st.lists(st.integers(-1, old - 1), min_size=1, max_size=12))
        scale = data.draw(st.lists(st.floats(-3, 3), min_size=len(src), max_size=len(src)))
        return SimpleNamespace(src=torch.tensor(src), scale=torch.tensor(scale, dtype=torch.float64), old=old)

    rows = axis(r_old)
    cols = axis(c_old) if two_d else None
    tp = SimpleNamespace(rows=rows, cols=cols)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    shape = (r_old, c_old) if two_d else (r_old,)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if two_d and data.draw(st.booleans()):  # the stored layout of a transposed plan
        x = x.t().contiguous().t()
    chunk = data.draw(st.sampled_from([1, 3, 1 << 16]))
    xd = x.double()
    r_ok, rs = rows.src >= 0, rows.src[rows.src >= 0]
    mapped = xd[rs] * rows.scale[r_ok].reshape(-1, *([1] * (xd.dim() - 1)))
    if two_d:
        c_ok = cols.src >= 0
        mapped = mapped[:, cols.src[c_ok]] * cols.scale[c_ok]
    want = float(mapped.pow(2).mean().sqrt()) if mapped.numel() else 0.0
    old_chunk, apply._CPU_CHUNK = apply._CPU_CHUNK, chunk
    try:
        got = apply.rms_mapped(x, tp)
    finally:
        apply._CPU_CHUNK = old_chunk
    assert got == pytest.approx(want, rel=1e-12, abs=1e-300)
