"""deepen_: depth growth of every family with its optimizer state, against models built
from the new config (tiny random configs, float64, CPU)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import growkern  # noqa: E402
from growkern.growth.adapter import config_attributes  # noqa: E402
from growkern.growth.depth import DEPTH_STRATEGIES, plan_depth  # noqa: E402
from hf_tiny import FAMILIES, V, batch, configs, logits, make, train_steps  # noqa: E402

# per strategy, a target depth from 2 blocks (upscale: 2L - 2 trim)
TARGET = {"identity": 3, "fresh": 4, "interleave": 4, "stack": 5, "upscale": 4}


def trained(family, seed=0, steps=2, **kw):
    model = make(family, seed)
    opt, sched = train_steps(model, steps, weight_decay=0.1,
                             scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)))
    return model, opt, sched


def fresh_build(model):
    cls = type(model)
    config = copy.deepcopy(model.config)
    return cls(config).double().eval()


def attributes(model):
    """Each module's plain attributes (where a saved model was loaded from aside)."""
    return {name: {k: v for k, v in config_attributes(m).items() if k != "name_or_path"}
            for name, m in model.named_modules()}


@pytest.mark.parametrize("strategy", DEPTH_STRATEGIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_grown_model_is_the_model_its_new_config_builds(family, strategy):
    model, opt, sched = trained(family)
    growkern.deepen_(model, opt, sched, n_layer=TARGET[strategy], strategy=strategy)
    ref = fresh_build(model)
    key = {"gpt2": "n_layer"}.get(family, "num_hidden_layers")
    assert getattr(model.config, key) == TARGET[strategy]
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert attributes(model) == attributes(ref)  # layer_idx, sliding windows, per-layer scales
    for n, b in ref.named_buffers():
        assert torch.equal(dict(model.named_buffers())[n], b), n
    if hasattr(model.config, "layer_types"):
        assert len(model.config.layer_types) == TARGET[strategy]


@pytest.mark.parametrize("strategy", ["identity", "fresh"])
@pytest.mark.parametrize("family", FAMILIES)
def test_preserving_strategies_keep_logits_and_cached_greedy_generation(family, strategy):
    model, opt, sched = trained(family)
    x = batch(seed=3, T=12)  # longer than gemma3's sliding window of 4
    before = logits(model, x)
    gen_before = model.generate(x[:, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    report = growkern.deepen_(model, opt, sched, n_layer=4, strategy=strategy, probe_batch=x)
    assert report.exact and report.dims_after == {"n_layer": 4}
    after = logits(model, x)
    assert (after - before).abs().max() <= 1e-12 * before.abs().max()
    assert torch.equal(model.generate(x[:, :5], max_new_tokens=6, do_sample=False, use_cache=True), gen_before)


@pytest.mark.parametrize("strategy", ["interleave", "stack", "upscale"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_kv_cache_agrees_with_full_recompute_after_growth(family, strategy):
    """Two blocks sharing a layer_idx would write one cache slot: cached and uncached
    greedy generation would then differ."""
    model, opt, _ = trained(family)
    growkern.deepen_(model, opt, n_layer=TARGET[strategy], strategy=strategy)
    x = batch(seed=4, T=5)
    cached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_gpt2_attention_scale_by_layer_index_is_kept_for_moved_blocks():
    cls, config = configs()["gpt2"]
    config.scale_attn_by_inverse_layer_idx = True
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).double().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = batch(seed=5)
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    before = logits(model, x)
    src_state = {k: v.clone() for k, v in opt.state[model.transformer.h[1].attn.c_attn.weight].items()}
    growkern.deepen_(model, opt, n_layer=4, strategy="identity", positions=[0, 0])  # block 1 moves to index 3
    assert (logits(model, x) - before).abs().max() <= 1e-12 * before.abs().max()
    moved = model.transformer.h[3].attn
    assert moved.layer_idx == 3 and moved.scaling == pytest.approx(1 / 4 ** 0.5 / 4)
    st = opt.state[moved.c_attn.weight]
    q = slice(0, 16)
    assert torch.allclose(st["exp_avg"][:, q], src_state["exp_avg"][:, q] / 2)  # c = (3+1)/(1+1)
    assert torch.allclose(st["exp_avg_sq"][:, q], src_state["exp_avg_sq"][:, q] / 4)
    assert torch.equal(st["exp_avg"][:, 16:], src_state["exp_avg"][:, 16:])


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_moment_rule_copies_inputs_and_starts_zeroed_outputs_fresh(family):
    model, opt, sched = trained(family)
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    src = {n: (p, {k: v.clone() for k, v in opt.state[p].items()}) for n, p in layers[0].named_parameters()}
    growkern.deepen_(model, opt, sched, n_layer=3, strategy="identity", positions=[0])
    new = dict(layers[1].named_parameters())
    outputs = {n for n in new if n.endswith(("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj.bias",
                                             "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight",
                                             "mlp.c_proj.bias"))}
    assert outputs
    groups = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    for n, p in new.items():
        old_p, old_state = src[n]
        assert p is not old_p and groups[id(p)] == groups[id(old_p)]
        if n in outputs:
            assert torch.count_nonzero(p) == 0 and p not in opt.state
        else:
            assert torch.equal(p, old_p)
            for k, v in old_state.items():
                assert torch.equal(opt.state[p][k], v) and opt.state[p][k] is not v


@pytest.mark.parametrize("strategy", DEPTH_STRATEGIES)
def test_two_steps_after_growth_update_every_new_parameter(strategy):
    model, opt, sched = trained("llama")
    growkern.deepen_(model, opt, sched, n_layer=TARGET[strategy], strategy=strategy)
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for i in range(2):
        x = batch(seed=20 + i)
        model(x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, snap[n])]
    assert unchanged == []


@pytest.mark.parametrize("strategy", ["identity", "stack"])
@pytest.mark.parametrize("family", ["gemma3", "gpt2", "qwen2"])
def test_save_pretrained_round_trip(family, strategy, tmp_path):
    model, opt, _ = trained(family)
    growkern.deepen_(model, opt, n_layer=4, strategy=strategy)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager").eval()
    x = batch(seed=6, T=12)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert attributes(loaded) == attributes(model)


def test_optimizer_state_dict_loads_into_an_optimizer_built_from_the_grown_model():
    """Each group's parameters are put in the model's order, so a checkpoint of the grown
    run resumes into an optimizer built afresh from the grown model."""
    model, opt, _ = trained("llama")
    growkern.deepen_(model, opt, n_layer=4, strategy="interleave")
    rebuilt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rebuilt.load_state_dict(opt.state_dict())
    for p in model.parameters():
        assert opt.state.get(p, {}).keys() == rebuilt.state.get(p, {}).keys()
        for k, v in opt.state.get(p, {}).items():
            assert torch.equal(rebuilt.state[p][k], v)


def test_growkern_gpt_grows_in_depth_with_muP_and_trains_on():
    cfg = growkern.GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, d_model=12, pos="rope",
                             norm="rmsnorm", mlp="swiglu", bias=True, parameterization="mup")
    torch.manual_seed(0)
    model = growkern.GPT(cfg).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = batch(seed=7, T=16)
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad()
    before = model(x)[0]
    growkern.deepen_(model, opt, factor=2, strategy="identity")
    assert model.config.n_layer == 4 and len(model.blocks) == 4
    assert torch.equal(model(x)[0], before)
    ref = growkern.GPT(model.config)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in model.named_parameters()]
    model(x, x)[1].backward()
    opt.step()


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_layer=2), "greater than"),
    (dict(n_layer=1), "greater than"),
    (dict(n_layer=3, factor=2), "exactly one"),
    (dict(factor=1.25), "whole number"),
    (dict(n_layer=3, strategy="grow"), "unknown depth strategy"),
    (dict(n_layer=3, positions=[2]), "0..1"),
    (dict(n_layer=4, positions=[0]), "one old block per new block"),
    (dict(n_layer=3, strategy="upscale"), "even"),
    (dict(n_layer=6, strategy="upscale"), "at most 4"),
    (dict(n_layer=4, strategy="stack", positions=[0, 1]), "not to stack"),
    (dict(n_layer=3, schedule="sideways"), "schedule"),
    (dict(n_layer=3, backend="cuda"), "backend"),
])
def test_bad_input_is_refused_with_nothing_changed(kwargs, message):
    model, opt, sched = trained("gemma3")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state, config, sched_state = copy.deepcopy(opt.state_dict()), model.config.to_dict(), sched.state_dict()
    with pytest.raises((ValueError, TypeError), match=message):
        growkern.deepen_(model, opt, sched, **kwargs)
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert model.config.to_dict() == config and sched.state_dict() == sched_state
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i, s in state["state"].items() for k, v in s.items()
               if torch.is_tensor(v))


def test_plan_places_new_blocks_evenly_and_as_the_papers_do():
    assert plan_depth(32, n_layer=40).sources[:5] == (0, 1, 2, 3, 3)  # LLaMA-Pro: after every 4th block
    assert plan_depth(3, n_layer=6, strategy="interleave").sources == (0, 0, 1, 1, 2, 2)
    assert plan_depth(3, n_layer=6, strategy="stack").sources == (0, 1, 2, 0, 1, 2)
    assert plan_depth(32, n_layer=48, strategy="upscale").sources == tuple(range(24)) + tuple(range(8, 32))
    assert plan_depth(2, n_layer=6, strategy="identity").sources == (0, 0, 0, 1, 1, 1)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
], ids=["foreach", "fused", "amsgrad", "sgd"])
def test_every_supported_optimizer_steps_after_depth_growth(make_opt):
    cfg = growkern.GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, d_model=12)
    torch.manual_seed(0)
    model = growkern.GPT(cfg)
    opt = make_opt(model.parameters())
    x = batch(seed=8, T=16)
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad()
    growkern.deepen_(model, opt, n_layer=4, strategy="interleave")
    copy_of = model.blocks[1].attn.q_proj.weight  # block 0's copy
    for k, v in opt.state[model.blocks[0].attn.q_proj.weight].items():
        assert torch.equal(opt.state[copy_of][k], v)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x, x)[1].backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("widths", [[], ["--factor", "2"]])
def test_grow_cli_deepens_a_model_directory_and_a_trainer_checkpoint(widths, tmp_path, capsys):
    from growkern import cli
    model, opt, _ = trained("qwen2")
    model.save_pretrained(tmp_path / "src")
    torch.save(opt.state_dict(), tmp_path / "src" / "optimizer.pt")
    (tmp_path / "src" / "trainer_state.json").write_text('{"global_step": 2, "log_history": []}')
    rc = cli.main(["grow", str(tmp_path / "src"), "--out", str(tmp_path / "deep"), "--n-layer", "4",
                   "--depth-strategy", "identity", *widths])
    out = capsys.readouterr().out
    assert rc == 0 and "n_layer 2 -> 4" in out and "growkern.deepen_" in out
    loaded = type(model).from_pretrained(tmp_path / "deep", dtype=torch.float64, attn_implementation="eager")
    assert loaded.config.num_hidden_layers == 4 and len(loaded.config.layer_types) == 4
    assert loaded.config.hidden_size == (32 if widths else 16)
    x = batch(seed=9)
    if not widths:  # identity: the same function
        assert (logits(loaded.eval(), x) - logits(model, x)).abs().max() <= 1e-12 * logits(model, x).abs().max()
    sd = torch.load(tmp_path / "deep" / "optimizer.pt", weights_only=True)
    rebuilt = torch.optim.AdamW(loaded.parameters(), lr=1e-2, weight_decay=0.1)
    rebuilt.load_state_dict(sd)  # indices in the grown model's order
    import json
    log = json.loads((tmp_path / "deep" / "trainer_state.json").read_text())["log_history"]
    assert [r["growth_strategy"] for r in log] == (["exact_copy"] if widths else []) + ["identity"]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=max(5, settings.default.max_examples // 2), deadline=None)
@given(family=st.sampled_from(["llama", "gemma3", "gpt2"]),
       n_layer=st.one_of(st.none(), st.integers(-1, 7)),
       factor=st.one_of(st.none(), st.sampled_from([1, 1.5, 2, 2.5, 3])),
       strategy=st.sampled_from(list(DEPTH_STRATEGIES) + ["deep"]),
       positions=st.one_of(st.none(), st.lists(st.integers(-1, 2), max_size=5)))
def test_random_depth_targets_grow_as_planned_or_change_nothing(family, n_layer, factor, strategy, positions):
    model, opt, sched = trained(family)
    x = batch()
    before = logits(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = copy.deepcopy(opt.state_dict())
    try:
        plan = plan_depth(2, n_layer=n_layer, factor=factor, strategy=strategy, positions=positions)
    except ValueError:
        plan = None
    try:
        report = growkern.deepen_(model, opt, sched, n_layer=n_layer, factor=factor, strategy=strategy,
                                  positions=positions)
    except (ValueError, TypeError):
        assert plan is None  # refused exactly when the plan is refused
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert len(opt.state_dict()["state"]) == len(moments["state"])
        return
    assert plan is not None and report.dims_after == {"n_layer": plan.new}
    assert len(list(model.parameters())) == sum(len(g["params"]) for g in opt.param_groups)
    if plan.exact:
        after = logits(model, x)
        assert (after - before).abs().max() <= 1e-12 * before.abs().max()
