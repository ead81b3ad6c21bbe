"""muP (growkern/mup.py) and szp at the muP scale: the coordinate check, SP at the base
width, growth that keeps logits and follows the LRs, checkpoints, szp's factors and state."""
import math
import warnings

import pytest
import torch

import growkern
from growkern import GPT, GPTConfig, widen_
from growkern.growth import mup
from growkern.models.gpt import param_kind as gpt_param_kind
from growkern.train import checkpoint as C
from growkern.train.loop import TrainConfig, build_optimizer, build_scheduler, init_model, make_batches, train

from test_train import cfg, synthetic_tokens, tiny

VOCAB = 53


def gpt(d_model=16, seed=0, dtype=torch.float64, **kw):
    c = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=d_model // 4, d_model=d_model)
    c.update(kw)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**c)).to(dtype)


def batch(seed=1, B=3, T=12, vocab=VOCAB):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def adam_steps(model, opt, sched=None, steps=2, vocab=VOCAB):
    for s in range(steps):
        x = batch(seed=10 + s, vocab=vocab)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0]


TC = TrainConfig(steps=100, warmup=10, lr=1e-2, min_lr=1e-3, weight_decay=0.1, fused=False, progress=False)


# --- the coordinate check ---------------------------------------------------------------

def _coord(param: str, d: int, steps=4, lr=1e-2) -> dict:
    """RMS of the logits and of the change of every block's output and of the logits
    after `steps` Adam steps at the same base LR (block outputs are the residual stream)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=d // 8, d_model=d, norm="layernorm",
                      parameterization=param, mup_base_width=32))
    tc = TrainConfig(steps=100, warmup=0, lr=lr, min_lr=lr, schedule="constant", weight_decay=0.0,
                     grad_clip=0.0, progress=False)
    opt = build_optimizer(m, tc)
    x = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(123))
    acts = {}
    for k, b in enumerate(m.blocks):
        b.register_forward_hook(lambda mod, i, o, k=k: acts.__setitem__(k, o.detach()))

    def probe():
        acts.clear()
        with torch.no_grad():
            return m(x[:, :-1])[0], dict(acts)

    l0, a0 = probe()
    for _ in range(steps):
        _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    l1, a1 = probe()
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    return {"logits": rms(l1), "dlogits": rms(l1 - l0), **{f"dblock{k}": rms(a1[k] - a0[k]) for k in a0}}


def test_coordinate_check():
    """muP: logits and the per-layer change of activations after 4 Adam steps stay O(1) in
    width (d_model 32, 64, 128 at fixed depth and head_dim; within 2x of each other).
    SP at the same base LR: they grow with width (here 3x to 10x from 32 to 128), which
    shows the check can fail."""
    widths = (32, 64, 128)
    for param in ("mup", "sp"):
        rows = {d: _coord(param, d) for d in widths}
        spread = {k: max(r[k] for r in rows.values()) / min(r[k] for r in rows.values()) for k in rows[32]}
        growth = {k: rows[128][k] / rows[32][k] for k in rows[32]}
        if param == "mup":
            assert all(s < 2.0 for s in spread.values()), (rows, spread)
        else:
            assert max(growth.values()) > 2.5, (rows, growth)
            assert all(g > 1.5 for g in growth.values()), (rows, growth)


# --- muP at the base width is SP --------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_mup_at_base_width_is_sp_bit_for_bit(tie):
    tc = cfg(steps=6, warmup=2, schedule="cosine")
    tokens = synthetic_tokens()
    runs = []
    for param in ("sp", "mup"):
        g = tiny(tie_embeddings=tie, bias=True, parameterization=param)
        m = init_model(g, seed=3)
        opt = build_optimizer(m, tc)
        sched = build_scheduler(opt, tc)
        x = batch(vocab=61)
        before = logits(m, x)
        hist = train(m, opt, sched, make_batches(tokens, tc), tc)
        runs.append((m, before, logits(m, x), [r["loss"] for r in hist], [r["lr"] for r in hist]))
    (sp, b_sp, a_sp, l_sp, lr_sp), (mp, b_mp, a_mp, l_mp, lr_mp) = runs
    assert mp.config.mup_base_width == mp.config.d_model  # None: the width it is created at
    assert torch.equal(b_sp, b_mp) and torch.equal(a_sp, a_mp)
    assert l_sp == l_mp and lr_sp == lr_mp
    for (n, p), (n2, q) in zip(sp.named_parameters(), mp.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    # SP configs are what they were: no new keys in their dict (checkpoints, study cache keys)
    assert "parameterization" not in tiny().to_dict() and "mup_base_width" not in tiny().to_dict()
    assert tiny(parameterization="mup", mup_base_width=8).to_dict()["mup_base_width"] == 8


def test_mup_config_validation():
    with pytest.raises(ValueError, match="parameterization must be one of"):
        tiny(parameterization="ntk")
    with pytest.raises(ValueError, match="mup_base_width must be a positive int"):
        tiny(parameterization="mup", mup_base_width=0)


# --- the rules: init, multipliers, groups ----------------------------------------------

def test_mup_init_lr_multipliers_and_groups():
    m = gpt(d_model=64, dtype=torch.float32, n_layer=2, tie_embeddings=False, bias=True,
            parameterization="mup", mup_base_width=16)
    c = m.config
    assert mup.width_mult(c) == 4 and mup.output_multiplier(c) == 0.25
    kinds = {n: gpt_param_kind(n) for n, _ in m.named_parameters()}
    assert kinds["wte.weight"] == kinds["wpe.weight"] == "input"
    assert kinds["lm_head.weight"] == "output"
    assert kinds["blocks.0.attn.q_proj.weight"] == kinds["blocks.1.mlp.down.weight"] == "hidden"
    assert kinds["blocks.0.attn.q_proj.bias"] == kinds["ln_f.weight"] == "vector"
    # init: hidden SP std / sqrt(m); embeddings and the head as SP
    assert math.isclose(m.init_std("blocks.0.mlp.up.weight"), 0.02 / 2)
    assert math.isclose(m.init_std("blocks.0.attn.o_proj.weight"), 0.02 / math.sqrt(4) / 2)
    assert m.init_std("wte.weight") == m.init_std("lm_head.weight") == 0.02
    assert abs(m.blocks[0].mlp.up.weight.std().item() - 0.01) < 0.001
    assert abs(m.wte.weight.std().item() - 0.02) < 0.002
    # forward: logits times 1/m
    x = batch()
    with torch.no_grad():
        h = m.ln_f(m.blocks[1](m.blocks[0](m.wte(x) + m.wpe(torch.arange(12)))))
        assert torch.allclose(logits(m, x), m.lm_head(h) / 4, atol=1e-6)
    # per-parameter LR multipliers and the optimizer groups (hidden lr / m, the rest lr)
    mults = mup.lr_multipliers(m)
    assert {n for n, v in mults.items() if v == 0.25} == {n for n, k in kinds.items() if k == "hidden"}
    assert all(v == 1.0 for n, v in mults.items() if kinds[n] != "hidden")
    opt = build_optimizer(m, TC)
    groups = [(g["lr"], g["mup_lr_mult"], g["weight_decay"], set(g["param_names"])) for g in opt.param_groups]
    hidden = {n for n, k in kinds.items() if k == "hidden"}
    assert groups[0] == (TC.lr, 1.0, TC.weight_decay, {"wte.weight", "wpe.weight"})
    assert groups[1] == (TC.lr / 4, 0.25, TC.weight_decay, hidden)
    assert groups[2] == (TC.lr, 1.0, TC.weight_decay, {"lm_head.weight"})
    assert groups[3][:3] == (TC.lr, 1.0, 0.0) and len(groups) == 4
    # SP keeps its two groups exactly
    sp_groups = build_optimizer(gpt(d_model=64, dtype=torch.float32), TC).param_groups
    assert len(sp_groups) == 2 and all("mup_lr_mult" not in g and g["lr"] == TC.lr for g in sp_groups)


# --- growth of a muP model ---------------------------------------------------------------

@pytest.mark.parametrize("tie,norm,factor", [(True, "layernorm", 2), (False, "layernorm", 2),
                                             (True, "rmsnorm", 1.5), (False, "rmsnorm", 3)])
def test_widen_mup_preserves_logits_and_follows_lrs(tie, norm, factor):
    m = gpt(d_model=16, tie_embeddings=tie, norm=norm, bias=(norm == "layernorm"),
            parameterization="mup", mup_base_width=8)
    opt = build_optimizer(m, TC)
    sched = build_scheduler(opt, TC)
    adam_steps(m, opt, sched, steps=3)
    x = batch()
    before = logits(m, x)
    rep = widen_(m, opt, sched, factor=factor, strategy="exact_copy", seed=2)
    assert rep.exact and m.config.mup_base_width == 8
    d_new = round(16 * factor)
    assert m.config.d_model == d_new and mup.output_multiplier(m.config) == 8 / d_new
    assert (logits(m, x) - before).abs().max().item() < 1e-12  # float64: function preserved
    # the groups' LRs are those of a muP model built at the new width, at the same step
    ref = GPT(m.config).double()
    ref_opt = build_optimizer(ref, TC)
    ref_sched = build_scheduler(ref_opt, TC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the scheduler without optimizer steps
        for _ in range(3):
            ref_sched.step()
    for g, r in zip(opt.param_groups, ref_opt.param_groups):
        assert g["param_names"] == r["param_names"]
        for key in ("lr", "initial_lr", "mup_lr_mult"):
            assert math.isclose(g[key], r[key], rel_tol=1e-12), (key, g[key], r[key])
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(sched.base_lrs, ref_sched.base_lrs))
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(sched.get_last_lr(), ref_sched.get_last_lr()))
    assert any("muP: the LRs" in n for n in rep.notes)
    # and training goes on
    adam_steps(m, opt, sched, steps=1)


def test_widen_mup_moments_follow_the_exact_rule():
    """With the logit multiplier changing, the head's (or tied final norm's) scale m'/m is
    covered by the moment rule: after growth and one more step, the grown model's copies
    of a unit stay identical (symmetric weights and moments give identical updates)."""
    for tie in (True, False):
        m = gpt(d_model=16, tie_embeddings=tie, norm="rmsnorm", parameterization="mup", mup_base_width=8)
        opt = build_optimizer(m, TC)
        adam_steps(m, opt, steps=3)
        widen_(m, opt, factor=2, strategy="exact_copy")
        adam_steps(m, opt, steps=2)
        w = m.blocks[0].mlp.up.weight.detach()  # rows: d_ff units (64) copied twice
        assert torch.allclose(w[:64], w[64:], atol=1e-12)
        head = m.wte.weight if tie else m.lm_head.weight
        assert torch.allclose(head[:, :16], head[:, 16:], atol=1e-12)


def test_widen_mup_refuses_a_group_whose_lrs_change_differently():
    m = gpt(d_model=16, parameterization="mup", mup_base_width=8)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)  # one group: hidden and embeddings together
    adam_steps(m, opt)
    w = m.wte.weight.detach().clone()
    with pytest.raises(ValueError, match="muP: optimizer group 0 holds"):
        widen_(m, opt, factor=2)
    assert m.config.d_model == 16 and torch.equal(m.wte.weight, w)  # nothing changed
    widen_(m, opt, d_ff=96)  # d_ff alone: m and every LR stay, so one group is fine
    assert opt.param_groups[0]["lr"] == 1e-3


def test_checkpoint_round_trip_of_a_grown_mup_run(tmp_path):
    tc = cfg(steps=12, warmup=3, schedule="cosine")
    tokens = synthetic_tokens()
    g = tiny(parameterization="mup", mup_base_width=8, tie_embeddings=False)
    model = init_model(g, seed=0)
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc)
    batches = make_batches(tokens, tc)
    train(model, opt, sched, batches, tc, end_step=4)
    widen_(model, opt, sched, factor=2, strategy="perturb", seed=1)
    C.save(tmp_path / "ck", model, opt, sched, step=4, train_config=tc, batches=batches)
    ck = C.load(tmp_path / "ck")
    assert ck.gpt_config.parameterization == "mup" and ck.gpt_config.d_model == 32
    assert ck.gpt_config.mup_base_width == 8
    for a, b in zip(opt.param_groups, ck.optimizer.param_groups):
        assert a["param_names"] == b["param_names"]
        for key in ("lr", "initial_lr", "mup_lr_mult", "weight_decay"):
            assert a[key] == b[key], key
    assert ck.optimizer.param_groups[1]["initial_lr"] == tc.lr / 4  # hidden: lr * 8 / 32
    assert ck.scheduler.base_lrs == sched.base_lrs
    # and it resumes exactly as the grown run in memory goes on
    ck.restore_rng()
    rest = train(ck.model, ck.optimizer, ck.scheduler, ck.batches(tokens), ck.train_config, start_step=4)
    goes_on = train(model, opt, sched, batches, tc, start_step=4)
    assert [r["loss"] for r in rest] == [r["loss"] for r in goes_on]
    assert [r["lr"] for r in rest] == [r["lr"] for r in goes_on]


# --- szp: shrink by the muP factor, zero-pad, perturb from the muP init, new run ---------

def test_szp_resets_state_and_restarts_the_schedule(tmp_path):
    tc = cfg(steps=20, warmup=4, schedule="cosine")
    tokens = synthetic_tokens()
    model = init_model(tiny(), seed=0)
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc)
    batches = make_batches(tokens, tc)
    train(model, opt, sched, batches, tc, end_step=8)
    assert sched.last_epoch == 8
    rep = widen_(model, opt, sched, factor=2, strategy="szp", seed=0)  # default schedule: restart
    assert rep.strategy == "szp(shrink=mup, carry_state=False)"
    for p in model.parameters():
        st = opt.state[p]
        assert int(st["step"]) == 0
        assert torch.all(st["exp_avg"] == 0) and torch.all(st["exp_avg_sq"] == 0)
    assert sched.last_epoch == 0
    assert [g["lr"] for g in opt.param_groups] == [tc.lr / tc.warmup] * 2  # warmup runs again
    assert sched.get_last_lr() == [tc.lr / tc.warmup] * 2
    hist = train(model, opt, sched, batches, tc, start_step=8, end_step=11)
    assert [r["lr"] for r in hist] == pytest.approx([tc.lr * k / tc.warmup for k in (1, 2, 3)])
    # a checkpoint of the new run loads: its scheduler counts from the restart
    C.save(tmp_path / "ck", model, opt, sched, step=11, train_config=tc, batches=batches)
    ck = C.load(tmp_path / "ck")
    assert ck.scheduler.last_epoch == 3 and [g["lr"] for g in ck.optimizer.param_groups] == \
        [g["lr"] for g in opt.param_groups]
    # any single torch scheduler restarts: CosineAnnealingLR back to its initial LR
    m2 = gpt(d_model=16)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, T_max=10)
    adam_steps(m2, o2, s2, steps=4)
    assert o2.param_groups[0]["lr"] < 1e-2
    widen_(m2, o2, s2, factor=2, strategy="szp")
    assert s2.last_epoch == 0 and o2.param_groups[0]["lr"] == 1e-2
    # explicit schedules win over the strategy's default; restart needs a scheduler
    m3 = gpt(d_model=16)
    o3 = torch.optim.AdamW(m3.parameters(), lr=1e-2)
    s3 = torch.optim.lr_scheduler.CosineAnnealingLR(o3, T_max=10)
    adam_steps(m3, o3, s3, steps=4)
    lr = o3.param_groups[0]["lr"]
    widen_(m3, o3, s3, factor=2, strategy="szp", schedule="continue")
    assert s3.last_epoch == 4 and o3.param_groups[0]["lr"] == lr
    with pytest.raises(ValueError, match="schedule='restart' needs the scheduler"):
        widen_(m3, o3, factor=2, strategy="exact_copy", schedule="restart")
    widen_(m3, o3, factor=2, strategy="szp")  # the default restart without a scheduler: nothing to restart


def _szp_case(param: str, tie: bool):
    """d_model 64 -> 128 with d_ff 256 -> 512: tensors large enough for the statistics."""
    m = gpt(d_model=64, dtype=torch.float32, n_layer=2, tie_embeddings=tie, bias=True, vocab_size=512,
            parameterization=param, mup_base_width=32 if param == "mup" else None)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3) if param == "sp" else build_optimizer(m, TC)
    adam_steps(m, opt, steps=2, vocab=512)
    old = {n: p.detach().clone() for n, p in m.named_parameters()}
    widen_(m, opt, factor=2, strategy="szp", seed=5)
    new = dict(m.named_parameters())
    return m, old, new


@pytest.mark.parametrize("param", ["sp", "mup"])
def test_szp_shrink_and_init_follow_mup(param):
    r = 64 / 128  # d_old / d_new
    for tie in (True, False):
        m, old, new = _szp_case(param, tie)
        # the muP init std at the new width: muP models their own; SP: muP with base = old width
        hidden_std = 0.02 / math.sqrt(128 / 32) if param == "mup" else 0.02 * math.sqrt(r)
        residual_std = hidden_std / math.sqrt(2 * 2)
        for name, std in (("blocks.0.attn.q_proj.weight", hidden_std), ("blocks.1.mlp.up.weight", hidden_std),
                          ("blocks.0.mlp.down.weight", residual_std), ("blocks.1.attn.o_proj.weight", residual_std)):
            w, w0 = new[name].detach(), old[name]
            R, K = w0.shape
            assert torch.equal(w[:R, :K], w0 * r), name  # kept entries: old * d_old/d_new exactly
            pad = torch.cat([w[R:].flatten(), w[:R, K:].flatten()])
            assert abs(pad.std().item() / std - 1) < 0.1, (name, pad.std().item(), std)
            assert abs(pad.mean().item()) < 0.1 * std
        # embeddings: kept as they are, new columns from the (width-independent) init
        wte = new["wte.weight"].detach()
        assert torch.equal(wte[:, :64], old["wte.weight"])
        assert abs(wte[:, 64:].std().item() / 0.02 - 1) < 0.1
        # biases kept (new 0), gains kept (new 1)
        b = new["blocks.0.mlp.up.bias"].detach()
        assert torch.equal(b[:256], old["blocks.0.mlp.up.bias"]) and torch.all(b[256:] == 0)
        g = new["blocks.0.ln_1.weight"].detach()
        assert torch.equal(g[:64], old["blocks.0.ln_1.weight"]) and torch.all(g[64:] == 1)
        # the readout: a muP model's output multiplier does it (weights kept); an SP model's
        # weights take d_old/d_new (the untied head; with tied embeddings the final norm)
        f = 1.0 if param == "mup" else r
        if tie:
            ln = new["ln_f.weight"].detach()
            assert torch.equal(ln[:64], old["ln_f.weight"] * f) and torch.all(ln[64:] == f)
        else:
            head = new["lm_head.weight"].detach()
            assert torch.equal(head[:, :64], old["lm_head.weight"] * f)
            assert abs(head[:, 64:].std().item() / (0.02 * f) - 1) < 0.1
            assert torch.equal(new["ln_f.weight"].detach()[:64], old["ln_f.weight"])
        assert mup.output_multiplier(m.config) == (32 / 128 if param == "mup" else 1.0)


class _SzpBeforeMup(growkern.Strategy):
    """szp as it was before muP (a frozen copy, for the test): old entries times 0.5, new
    entries zero, N(0, init_std^2) on every matrix entry, moments of kept entries kept."""
    name = "test_szp_before_mup"
    preserving = False
    moments = "keep"
    rescale_norms = False

    def dim_map(self, dim, old, new, generator):
        return growkern.DimMap.build(dim, old, new, copies=False, remainder="fresh")

    def preservation(self, plan):
        return False, "szp shrinks and perturbs the weights"

    def tensor_plan(self, plan, tp):
        if tp.kind in ("gain", "norm_bias"):
            tp.rows.scale = torch.ones_like(tp.rows.scale)
            tp.fresh_value = 1.0 if tp.kind == "gain" else 0.0
            return tp
        tp.rows.scale = tp.rows.scale * 0.5
        if tp.cols is not None:
            tp.rows.sign = torch.ones(tp.rows.src.numel(), dtype=torch.float64)
            tp.cols.sign = torch.ones(tp.cols.src.numel(), dtype=torch.float64)
            tp.noise = tp.noise_fresh = tp.init_std
            tp.noise_mode = "absolute"
        return tp


@pytest.mark.parametrize("tie", [True, False])
def test_szp_legacy_option_reproduces_the_old_operator(tie):
    growkern.register_strategy(_SzpBeforeMup)
    out = []
    for strategy, opts in (("szp", dict(shrink=0.5, carry_state=True)), ("test_szp_before_mup", {})):
        m = gpt(d_model=16, tie_embeddings=tie, bias=True)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        adam_steps(m, opt, sched, steps=3)
        rep = widen_(m, opt, sched, factor=2, strategy=strategy, seed=7, **opts)
        out.append((m, opt, sched, rep))
    (a, oa, sa, ra), (b, ob, sb, _) = out
    assert ra.strategy == "szp(shrink=0.5, carry_state=True)"
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa.state[p][key], ob.state[q][key]), (n, key)
        assert int(oa.state[p]["step"]) == int(ob.state[q]["step"]) == 3  # step carried
    assert sa.last_epoch == sb.last_epoch == 3  # schedule continues
    assert [g["lr"] for g in oa.param_groups] == [g["lr"] for g in ob.param_groups]
