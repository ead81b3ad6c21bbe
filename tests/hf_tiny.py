"""Tiny random Hugging Face causal LMs of every family growkern grows, for the tests."""
import torch
import transformers

V = 61  # odd vocabulary on purpose
COMMON = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def configs():
    T = transformers
    return {
        # untied, biases everywhere, GQA
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)),
        # MQA
        "mistral": (T.MistralForCausalLM, T.MistralConfig(**{**COMMON, "num_key_value_heads": 1})),
        # tied, q/k/v biases
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**COMMON, tie_word_embeddings=True)),
        # head_dim independent of hidden_size / heads, q_norm/k_norm
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config(**{**COMMON, "head_dim": 6}, tie_word_embeddings=True)),
        # fused qkv_proj and gate_up_proj, partial rotary
        "phi3": (T.Phi3ForCausalLM, T.Phi3Config(**COMMON, partial_rotary_factor=0.5)),
        # (1 + w) norms, sqrt(hidden) embedding scale with a tied head, soft-capping
        "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(**{**COMMON, "head_dim": 4})),
        # as gemma2, plus q/k norms, free head_dim, sliding and full layers with their own RoPE
        "gemma3": (T.Gemma3ForCausalLM, T.Gemma3TextConfig(**{**COMMON, "head_dim": 6}, sliding_window=4,
                                                           layer_types=["sliding_attention", "full_attention"])),
        # transposed Conv1D, fused c_attn, LayerNorm, learned positions, n_inner=None
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    }


FAMILIES = list(configs())
EXACT_TOL = {"gpt2": 1e-12}  # relative to max |logits|; the rest compute norms/RoPE in float32


def make(family, seed=0):
    cls, config = configs()[family]
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).double().eval()
    with torch.no_grad():  # norms away from their init, so their maps matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.1, 0.3)
    return model


def batch(seed=1, B=2, T=9):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def train_steps(model, steps=2, scheduler=None, **opt_kw):
    """`steps` AdamW steps (lr 1e-2, `opt_kw`) on fixed batches, the scheduler made by
    scheduler(optimizer) stepping too when given; the model left in eval mode. Returns the
    optimizer, or (optimizer, scheduler) with a scheduler."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **opt_kw)
    sched = scheduler(opt) if scheduler is not None else None
    model.train()
    for s in range(steps):
        x = batch(seed=10 + s)
        model(x, labels=x).loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
    model.eval()
    return opt if sched is None else (opt, sched)
