"""Hugging Face causal LMs grown in place: every family, tiny random configs, CPU.

Models run in float64 with eager attention. transformers computes RMSNorm, the
RoPE tables and eager softmax in float32 even in a float64 model, so preservation
for those families holds to about 1e-7 relative, not 1e-15 (GPT-2, all float64,
is exact to rounding).
"""
import copy

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import growkern  # noqa: E402
from growkern import plan_growth, widen_  # noqa: E402
from growkern.growth.adapter import (EMBEDDING, FINAL_NORM_BIAS, FINAL_NORM_GAIN, NORM_BIAS, NORM_GAIN, POSITIONS,
                                     Adapter, fused, linear)

from hf_tiny import EXACT_TOL, FAMILIES, V, batch, logits, make, train_steps  # noqa: E402


def assert_preserved(family, before, after):
    tol = EXACT_TOL.get(family, 1e-6)
    assert (after - before).abs().max() <= tol * before.abs().max(), (after - before).abs().max()


def derived_state(model):
    """Every plain attribute and buffer of every module: what forward, generate and
    save read besides the parameters."""
    out = {}
    for name, mod in model.named_modules():
        for k, v in vars(mod).items():
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple, torch.Size)):
                out[f"{name}.{k}"] = v
        for k, b in mod._buffers.items():
            if b is not None:
                out[f"{name}.{k}"] = (tuple(b.shape), b.double().sum().item())
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_copy_preserves_generates_and_is_a_model_of_the_new_size(family):
    model = make(family)
    opt = train_steps(model)
    x = batch()
    before = logits(model, x)
    gen_before = model.generate(x, max_new_tokens=6, do_sample=False)
    rep = widen_(model, opt, factor=2, probe_batch=x)
    assert rep.exact and rep.dims_after["d_model"] == 32
    assert_preserved(family, before, logits(model, x))
    assert rep.preservation["kl_small_wide"] < 1e-10
    # greedy decoding with the KV cache picks the same tokens
    assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False), gen_before)
    # every derived attribute and buffer is what a model built from the new config has
    # (head_dim, scaling, split_size, Conv1D.nf, normalized_shape, eps, inv_freq, embed_scale, ...)
    torch.set_default_dtype(torch.float64)  # as from_pretrained(dtype=torch.float64) builds it
    try:
        fresh = type(model)(copy.deepcopy(model.config))
    finally:
        torch.set_default_dtype(torch.float32)
    assert derived_state(model) == derived_state(fresh)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in fresh.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    model = make(family)
    x = batch()
    widen_(model, factor=2, strategy="perturb", seed=3)
    grown = logits(model, x)
    model.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager").eval()
    assert back.config.hidden_size == 32
    # not bit-equal: .double() made the live model's RoPE buffers float64, a reload keeps them float32
    assert (logits(back, x) - grown).abs().max() <= 1e-14 * grown.abs().max()


def mapped(plan, name, t, power=1):
    """The plan's moment map applied to a small model's tensor (gradient, exp_avg)."""
    tp = plan.tensors[name]
    t = t.t() if tp.transposed else t
    r, c = tp.moment_scales()
    out = t[tp.rows.src] * (r ** power).view(-1, *([1] * (t.dim() - 1)))
    if tp.cols is not None:
        out = out[:, tp.cols.src] * (c ** power)
    return out.t() if tp.transposed else out


@pytest.mark.parametrize("family", FAMILIES)
def test_moment_rule_first_update_is_the_small_update_mapped(family):
    model = make(family)
    opt = train_steps(model, fused=True)
    small = copy.deepcopy(model)
    small_opt = torch.optim.AdamW(small.parameters(), lr=1e-2, fused=True)
    small_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    x = batch(seed=7)
    small(x, labels=x).loss.backward()
    small_grads = {n: p.grad.clone() for n, p in small.named_parameters()}
    small_opt.step()

    plan = plan_growth(model, factor=2)
    widen_(model, opt, plan=plan)
    model(x, labels=x).loss.backward()
    scale = max(g.abs().max().item() for g in small_grads.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, mapped(plan, n, small_grads[n]), rtol=1e-5, atol=1e-6 * scale)
    opt.step()  # fused AdamW on the grown state
    small_params = dict(small.named_parameters())
    for n, p in model.named_parameters():
        st, sst = opt.state[p], small_opt.state[small_params[n]]
        assert st["exp_avg"].shape == p.shape and int(st["step"]) == 3
        torch.testing.assert_close(st["exp_avg"], mapped(plan, n, sst["exp_avg"]), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
def test_non_integer_growth_is_exact_or_says_why(family):
    model = make(family)
    x = batch()
    before = logits(model, x)
    plan = plan_growth(model, factor=1.5)
    widen_(model, plan=plan)
    assert model.config.hidden_size == plan.new.d_model > 16  # MQA: kv heads 1 -> 2 gives 32
    after = logits(model, x)
    if plan.exact:
        assert_preserved(family, before, after)
    else:
        # LayerNorm over a zero-padded residual, or an eps shared with q/k norms
        assert family in ("gpt2", "qwen3", "gemma3"), plan.not_exact_because
        assert ("LayerNorm" if family == "gpt2" else "q_norm/k_norm") in plan.not_exact_because


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_heads_grow_alone_when_head_dim_is_free(family):
    model = make(family)
    x = batch()
    before = logits(model, x)
    widen_(model, n_head=8)
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (16, 8, 4, 6)
    assert_preserved(family, before, logits(model, x))


@pytest.mark.parametrize("strategy", ["perturb", "asym_reset", "structured"])
def test_strategies_on_a_fused_transposed_model(strategy):
    model = make("gpt2")
    opt = train_steps(model)
    x = batch()
    before = logits(model, x)
    rep = widen_(model, opt, factor=2, strategy=strategy, seed=1)
    if rep.exact:
        assert_preserved("gpt2", before, logits(model, x))
    opt.step()  # the grown state steps


def test_head_dim_growth_refused_unchanged():
    model = make("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="head_dim growth"):
        widen_(model, d_model=32, n_head=4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.config.hidden_size == 16


def test_unknown_family_refused_unchanged():
    T = transformers
    model = T.BertLMHeadModel(T.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=24, is_decoder=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"does not know how to grow BertLMHeadModel "
                                        r"\(transformers\.models\.bert\.\S+\); known: .*transformers\.LlamaForCausalLM"):
        widen_(model, factor=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.config.hidden_size == 16


def test_import_growkern_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, growkern; growkern.adapters(); print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# --- a user's own model: nanoGPT style, grown through register_adapter ---------------

class NanoConfig:
    def __init__(self, vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=True):
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.n_head, self.n_embd, self.bias = n_head, n_embd, bias


class NanoLayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head, self.n_embd = c.n_head, c.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1, self.attn = NanoLayerNorm(c.n_embd, c.bias), NanoAttention(c)
        self.ln_2 = NanoLayerNorm(c.n_embd, c.bias)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias),
                                      c_proj=nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(nn.functional.gelu(self.mlp.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd), wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(NanoBlock(config) for _ in range(config.n_layer)),
            ln_f=NanoLayerNorm(config.n_embd, config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.size(1)))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


NANO = Adapter(
    name="nanogpt",
    classes=(NanoGPT,),
    params={
        r"transformer\.wte\.weight": EMBEDDING,
        r"transformer\.wpe\.weight": POSITIONS,
        r"transformer\.h\.\d+\.ln_[12]\.weight": NORM_GAIN,
        r"transformer\.h\.\d+\.ln_[12]\.bias": NORM_BIAS,
        r"transformer\.h\.\d+\.attn\.c_attn\.weight": fused(("q", "query"), ("kv", "produce"), ("kv", "produce")),
        r"transformer\.h\.\d+\.attn\.c_attn\.bias": fused(("q", "query"), ("kv", "produce"), ("kv", "produce"),
                                                         bias=True),
        r"transformer\.h\.\d+\.attn\.c_proj\.weight": linear("d_model", "q"),
        r"transformer\.h\.\d+\.attn\.c_proj\.bias": linear("d_model", "q", bias=True),
        r"transformer\.h\.\d+\.mlp\.c_fc\.weight": linear("d_ff", "d_model"),
        r"transformer\.h\.\d+\.mlp\.c_fc\.bias": linear("d_ff", "d_model", bias=True),
        r"transformer\.h\.\d+\.mlp\.c_proj\.weight": linear("d_model", "d_ff"),
        r"transformer\.h\.\d+\.mlp\.c_proj\.bias": linear("d_model", "d_ff", bias=True),
        r"transformer\.ln_f\.weight": FINAL_NORM_GAIN,
        r"transformer\.ln_f\.bias": FINAL_NORM_BIAS,
    },
    config_keys=dict(d_model="n_embd", n_head="n_head", vocab_size="vocab_size", n_layer="n_layer"),
    norm="layernorm",
    head_dim_growth=True,  # learned positions; SDPA's scale is read from the head size
)


@pytest.fixture
def nano_registered():
    growkern.register_adapter(NANO)
    yield
    growkern.growth.adapter._ADAPTERS.remove(NANO)


def nano_one_step():
    """A NanoGPT after one AdamW step on a fixed batch: (model, optimizer, the batch)."""
    torch.manual_seed(0)
    model = NanoGPT(NanoConfig()).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = batch(T=12)
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    return model, opt, x


def test_nanogpt_style_model_grows_through_register_adapter(nano_registered):
    model, opt, x = nano_one_step()
    before = model(x)
    rep = widen_(model, opt, factor=2)
    assert rep.exact and model.config.n_embd == 32 and model.transformer.h[0].attn.n_embd == 32
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (model(x) - before).abs().max() <= 1e-12 * before.abs().max()
    opt.step()


@pytest.mark.parametrize("strategy", ["identity", "fresh", "stack"])
def test_nanogpt_style_model_grows_in_depth_through_the_same_adapter(nano_registered, strategy):
    """The blocks' ModuleList is found from the parameter names (transformer.h); the new
    blocks train with the same optimizer and the config describes the new depth."""
    model, opt, x = nano_one_step()
    opt.zero_grad()
    before = model(x)
    rep = growkern.deepen_(model, opt, n_layer=4, strategy=strategy)
    assert model.config.n_layer == 4 and len(model.transformer.h) == 4 and rep.exact == (strategy != "stack")
    if rep.exact:
        assert (model(x) - before).abs().max() <= 1e-12 * before.abs().max()
    assert [type(b) for b in model.transformer.h] == [NanoBlock] * 4
    grown = NanoGPT(model.config)
    assert [(n, p.shape) for n, p in grown.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()


def test_nanogpt_d_ff_its_config_cannot_hold_is_refused_unchanged(nano_registered):
    model = NanoGPT(NanoConfig()).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="config cannot express this growth"):
        widen_(model, d_ff=80)  # NanoGPT always builds 4 * n_embd
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.transformer.h[0].mlp.c_fc.out_features == 64


# --- boundaries: random targets either grow exactly as planned or change nothing -------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _mostly(valid, anything):
    """Values that usually plan, sometimes anything (the refusals are the other half of the test)."""
    return st.one_of(st.none(), st.sampled_from(valid), st.sampled_from(valid), anything)


@settings(max_examples=max(5, settings.default.max_examples * 3 // 4))
@given(family=st.sampled_from(["llama", "qwen3", "phi3", "gemma2", "gpt2"]),
       factor=_mostly([1, 1.5, 2, 3], st.floats(0.5, 3.5, allow_nan=False)),
       d_model=_mostly([16, 24, 32, 48], st.integers(8, 48)),
       d_ff=_mostly([64, 72, 96], st.integers(8, 100)),
       n_head=_mostly([4, 6, 8, 12], st.integers(1, 12)),
       strategy=st.sampled_from(["exact_copy", "perturb", "asym_reset"]))
def test_random_targets_grow_as_planned_or_change_nothing(family, factor, d_model, d_ff, n_head, strategy):
    model = make(family)
    opt = train_steps(model, steps=1)
    x = batch()
    before = logits(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    config = model.config.to_dict()
    try:
        plan = plan_growth(model, factor=factor, d_model=d_model, d_ff=d_ff, n_head=n_head,
                           strategy=strategy, seed=1)
        widen_(model, opt, plan=plan)
    except (ValueError, TypeError) as e:
        assert str(e)  # a message naming the problem
        assert model.config.to_dict() == config
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(v, moments[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())
        return
    for n, p in model.named_parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape, n
    if plan.exact:
        assert_preserved(family, before, logits(model, x))
    model(x, labels=x).loss.backward()
    opt.step()


def test_gpt2_explicit_d_ff_writes_n_inner(tmp_path):
    """GPT-2 configs leave n_inner None (4 n_embd): a d_ff that is not 4 n_embd only
    survives a reload because growkern writes n_inner."""
    model = make("gpt2")
    assert model.config.n_inner is None
    x = batch()
    before = logits(model, x)
    widen_(model, d_ff=100)
    assert model.config.n_inner == 100 and model.transformer.h[0].mlp.c_fc.nf == 100
    assert_preserved("gpt2", before, logits(model, x))
    model.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager").eval()
    assert back.transformer.h[0].mlp.c_fc.weight.shape == (16, 100)
    assert_preserved("gpt2", before, logits(back, x))
