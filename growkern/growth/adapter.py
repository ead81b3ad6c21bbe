"""Model adapters: what growkern needs to know about a model class to grow it.

An adapter is data, not code paths: a table from parameter-name patterns to the
axes each parameter sits on, the config keys that hold the widths, the norm kind
and the embedding scaling. The plan (growkern/growth/plan.py), the strategies and the
kernels only ever see the `Shape` and the `Param` specs an adapter gives them.

After the weights have grown, an adapter brings everything the model derives from
its config up to date by construction: it builds the model class twice with its
parameters on the meta device, from the old and from the new config, and copies
to the live model every plain attribute and buffer that differs between the two
(head_dim, scaling, split_size, Conv1D.nf, LayerNorm.normalized_shape, eps, RoPE
inv_freq, embedding scales, ...). The same two builds validate the growth up
front: the grown parameter shapes must be those of a model built from the new
config, or nothing is changed.

The families growkern knows are in growkern/models/ (gpt.py, hf_families.py); register your own with
`growkern.register_adapter`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

# --- the width description every plan reads ---------------------------------------


@dataclass(frozen=True)
class Shape:
    """The widths of a model, whatever its class."""
    vocab_size: int
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int
    norm: str = "rmsnorm"  # "layernorm" or "rmsnorm" (the residual-stream norms)
    norm_eps: float = 1e-5
    n_positions: int | None = None  # learned position embeddings, else None
    tie_embeddings: bool = False
    head_dim_growth: bool = False  # whether head_dim may grow (no RoPE, scale read from head_dim)
    embed_multiplier: float = 1.0  # the residual stream starts as multiplier * embedding row
    eps_fixed_because: str = ""  # why the residual norms' eps cannot be rescaled alone, if so

    @property
    def head_dim_tied(self) -> bool:
        """d_model = n_head * head_dim, as in GPT-2/Llama, rather than a free head_dim (Qwen3, Gemma)."""
        return self.d_model == self.n_head * self.head_dim

    def replace(self, **changes) -> "Shape":
        return dataclasses.replace(self, **changes)

    def widths(self) -> dict:
        """The widths growth changes, as reports show them."""
        return {"d_model": self.d_model, "d_ff": self.d_ff, "n_head": self.n_head,
                "n_kv_head": self.n_kv_head, "head_dim": self.head_dim}


# --- parameters: which axis is which ------------------------------------------------

# A segment is (dim, role). dims: "vocab", "position", "d_model", "d_ff", "head_dim",
# "q" (query heads x head_dim), "kv" (kv heads x head_dim). roles: "produce" writes the
# units of its dim, "consume" reads them (fan-in, split), "query" the rows of a query
# projection, "norm" a residual norm's gain or bias, "fixed" an axis that is not rescaled.
Segment = tuple[str, str]


@dataclass(frozen=True)
class Param:
    """The layout of one parameter, in (out, in) orientation: rows are the output
    axis, cols the input axis. An axis is one or more segments laid end to end (a
    fused [q | k | v] projection has three)."""
    rows: tuple[Segment, ...]
    cols: tuple[Segment, ...] | None = None
    kind: str = "matrix"  # "matrix", "bias", "gain" (a norm's weight), "norm_bias"
    transposed: bool = False  # stored as (in, out), like GPT-2's Conv1D
    residual_out: bool = False  # an output projection into the residual (init std / sqrt(2 n_layer))
    final_norm: bool = False  # the norm whose output only the LM head reads

    def __post_init__(self):
        kinds = ("matrix", "bias", "gain", "norm_bias")
        if self.kind not in kinds:
            raise ValueError(f"Param kind must be one of {kinds}, got {self.kind!r}")
        if (self.cols is None) != (self.kind != "matrix"):
            raise ValueError("a matrix Param has rows and cols; a bias, gain or norm_bias has rows only")


def linear(out: str, inp: str, *, out_role: str = "produce", bias: bool = False, **kw) -> Param:
    """The weight (or, with bias=True, the bias) of a projection from `inp` to `out`."""
    rows = ((out, out_role),)
    if bias:
        return Param(rows, kind="bias")
    return Param(rows, ((inp, "consume"),), **kw)


def fused(*segments: Segment, inp: str = "d_model", bias: bool = False, **kw) -> Param:
    """A projection whose outputs are segments end to end: [q | k | v], [gate | up]."""
    if bias:
        return Param(tuple(segments), kind="bias")
    return Param(tuple(segments), ((inp, "consume"),), **kw)


EMBEDDING = Param((("vocab", "fixed"),), (("d_model", "produce"),))
POSITIONS = Param((("position", "fixed"),), (("d_model", "produce"),))
LM_HEAD = Param((("vocab", "fixed"),), (("d_model", "consume"),))
NORM_GAIN = Param((("d_model", "norm"),), kind="gain")
NORM_BIAS = Param((("d_model", "norm"),), kind="norm_bias")
FINAL_NORM_GAIN = Param((("d_model", "norm"),), kind="gain", final_norm=True)
FINAL_NORM_BIAS = Param((("d_model", "norm"),), kind="norm_bias", final_norm=True)
HEAD_NORM_GAIN = Param((("head_dim", "fixed"),), kind="gain")  # q_norm / k_norm over head_dim


# --- adapters ---------------------------------------------------------------------------

DIM_KEYS = ("d_model", "d_ff", "n_head", "n_kv_head", "head_dim", "norm_eps")  # written after growth
READ_KEYS = ("vocab_size", "n_layer", "norm")  # only read ("norm": a config choosing the norm kind)


@dataclass
class Adapter:
    """How to grow one model class (or several that share a layout).

    params: regex over the names of model.named_parameters() -> Param; every
      parameter must match exactly one pattern.
    config_keys: Shape field -> the config attribute holding it (d_model, d_ff,
      n_head, n_kv_head, head_dim, norm_eps, vocab_size, n_layer, norm). A
      width with no key is read off the parameter shapes and must follow from the
      others when the class is built from the new config (checked up front).
    classes: the classes this adapter grows, matched on the model's MRO (so their
      subclasses too): a class object matches itself; a dotted name "package.Class"
      matches a class of that name defined in that package or one of its modules (how
      the Hugging Face tables name transformers' classes without importing it); a bare
      name "Class" matches any class of that name, wherever it is defined (for your
      own adapters; growkern's never use one, since a user's class may share the name).
      A class object or dotted name wins over a bare name when both match.
    norm: the residual norms, "layernorm" or "rmsnorm" (or read from config_keys["norm"]).
    gain_offset: norms compute x_hat * (gain_offset + weight) (Gemma: 1).
    embed_multiplier: Shape -> the factor the embedding output is multiplied by
      (Gemma: sqrt(d_model)); None for 1.
    head_dim_growth: whether head_dim may grow (attention reads its scale from head_dim
      and positions are not rotary); a bool or config -> bool.
    init_std: (config, name, Param) -> the init std of a new matrix entry (szp, scratch).
    build: config -> a model of the class (default type(model)(config)).
    config_in_place: set the new widths on model.config itself (modules hold it, as in
      transformers) rather than giving the model a new config object.
    finish: (model) -> None, anything the two-build sync cannot do (buffers built on
      the parameters' device).
    config_class: the config type plan_growth may be given instead of a model (it then
      plans on a meta-device build), or None.
    Depth (deepen_, growkern/growth/deepen.py):
    layers: the dotted path of the nn.ModuleList of blocks ("model.layers"); None: the one
      prefix every "<prefix>.<index>." parameter name shares.
    layer_lists: config attributes holding one entry per layer (Gemma's and Qwen's
      "layer_types"); a grown config lists each new layer's source's entry.
    layer_counts: config attributes counting leading layers (Qwen2's "max_window_layers");
      a grown config counts the new layers whose sources were among them.
    query_scale_at: (config, layer index) -> the factor a layer multiplies its attention
      logits by on top of 1/sqrt(head_dim), when it depends on the index (GPT-2's
      scale_attn_by_inverse_layer_idx: 1/(index+1)); None when it does not.
    """
    name: str
    classes: tuple
    params: dict[str, Param]
    config_keys: dict[str, str]
    norm: str = "rmsnorm"
    gain_offset: float = 0.0
    embed_multiplier: Callable[[Shape], float] | None = None
    head_dim_growth: bool | Callable[[object], bool] = False
    init_std: Callable[[object, str, Param], float] | None = None
    build: Callable[[object], nn.Module] | None = None
    config_in_place: bool = True
    finish: Callable[[nn.Module], None] | None = None
    config_class: type | None = None
    layers: str | None = None
    layer_lists: tuple = ()
    layer_counts: tuple = ()
    query_scale_at: Callable[[object, int], float] | None = None
    _compiled: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("Adapter.name must be a non-empty string")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"Adapter {self.name}: norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        for k in self.config_keys:
            if k not in DIM_KEYS + READ_KEYS:
                raise ValueError(f"Adapter {self.name}: unknown config_keys entry {k!r}; allowed: "
                                 f"{', '.join(DIM_KEYS + READ_KEYS)}")
        if "n_head" not in self.config_keys:
            raise ValueError(f"Adapter {self.name}: config_keys needs 'n_head' (the head count "
                             f"cannot be read off parameter shapes)")
        if isinstance(self.classes, (str, type)):
            self.classes = (self.classes,)
        if not isinstance(self.classes, (tuple, list)) or not self.classes or not all(
                isinstance(c, type) or (isinstance(c, str) and c.strip(".") == c and c) for c in self.classes):
            raise TypeError(f"Adapter {self.name}: classes must be a tuple of classes or class names "
                            f"('Class' or 'package.Class'), got {self.classes!r}")
        self.classes = tuple(self.classes)
        self._compiled = [(re.compile(p), spec) for p, spec in self.params.items()]

    # -- matching ---------------------------------------------------------------------

    def match_rank(self, model: nn.Module) -> int:
        """2: a class of the model's MRO is one of `classes` (or its dotted name); 1: only
        a bare name matches; 0: no match."""
        rank = 0
        for cls in type(model).__mro__:
            for want in self.classes:
                if isinstance(want, type):
                    if cls is want:
                        return 2
                elif "." in want:
                    package, _, name = want.rpartition(".")
                    module = getattr(cls, "__module__", "") or ""
                    if cls.__name__ == name and (module == package or module.startswith(package + ".")):
                        return 2
                elif cls.__name__ == want:
                    rank = 1
        return rank

    def matches(self, model: nn.Module) -> bool:
        return self.match_rank(model) > 0

    def spec_of(self, name: str) -> Param:
        """The Param of one parameter name; ValueError when no pattern (or several) matches."""
        hits = [spec for rx, spec in self._compiled if rx.fullmatch(name)]
        if len(hits) != 1:
            why = "no pattern matches it" if not hits else f"{len(hits)} patterns match it"
            raise ValueError(f"adapter {self.name!r}: parameter {name!r}: {why}")
        return hits[0]

    def layout(self, model: nn.Module) -> dict[str, Param]:
        """name -> Param for every parameter of the model; ValueError naming the first
        parameter no pattern (or more than one) matches."""
        out = {}
        for name, _ in model.named_parameters():
            hits = [spec for rx, spec in self._compiled if rx.fullmatch(name)]
            if len(hits) != 1:
                why = "no pattern matches it" if not hits else f"{len(hits)} patterns match it"
                raise ValueError(f"cannot grow {type(model).__name__} with adapter {self.name!r}: "
                                 f"parameter {name!r}: {why}")
            out[name] = hits[0]
        return out

    # -- widths -------------------------------------------------------------------------

    def _get(self, config, key, default=None):
        attr = self.config_keys.get(key)
        v = getattr(config, attr, None) if attr else None
        return default if v is None else v

    def shape(self, model: nn.Module, layout: dict[str, Param] | None = None) -> Shape:
        """The model's widths, from its config and, for widths with no config key,
        its parameter shapes (`layout`: self.layout(model), when the caller has it)."""
        config = model.config
        layout = layout if layout is not None else self.layout(model)
        params = dict(model.named_parameters())

        def size_of(dim):
            for name, spec in layout.items():
                p = params[name]
                shape = tuple(p.shape)[::-1] if spec.transposed else tuple(p.shape)
                for axis, segs in ((0, spec.rows), (1, spec.cols)):
                    if segs is not None and len(segs) == 1 and segs[0][0] == dim:
                        return shape[axis]
            return None

        d_model = self._get(config, "d_model") or size_of("d_model")
        n_head = self._get(config, "n_head")
        n_kv_head = self._get(config, "n_kv_head", n_head)
        head_dim = self._get(config, "head_dim") or d_model // n_head
        d_ff = self._get(config, "d_ff") or size_of("d_ff") or 0
        vocab = self._get(config, "vocab_size") or size_of("vocab")
        n_layer = self._get(config, "n_layer", 0)
        n_pos = size_of("position")
        eps_fixed = ""
        if "norm_eps" not in self.config_keys:
            eps_fixed = f"{type(model).__name__}'s norm eps is not in its config"
        elif any(spec == HEAD_NORM_GAIN for spec in layout.values()):
            eps_fixed = "q_norm/k_norm read the same config eps as the residual norms"
        shape = Shape(vocab_size=int(vocab), n_layer=int(n_layer), d_model=int(d_model), d_ff=int(d_ff),
                      n_head=int(n_head), n_kv_head=int(n_kv_head), head_dim=int(head_dim),
                      norm=self._get(config, "norm", self.norm),
                      norm_eps=float(self._get(config, "norm_eps", 1e-5)), n_positions=n_pos,
                      tie_embeddings=_tied(model),
                      head_dim_growth=bool(self.head_dim_growth(config) if callable(self.head_dim_growth)
                                           else self.head_dim_growth),
                      eps_fixed_because=eps_fixed)
        if self.embed_multiplier is not None:
            shape = shape.replace(embed_multiplier=float(self.embed_multiplier(shape)))
        return shape

    def new_config(self, config, new: Shape):
        """A copy of `config` with the widths of `new`."""
        out = copy.deepcopy(config)
        for key, attr in self.config_keys.items():
            if key in DIM_KEYS:
                setattr(out, attr, getattr(new, key))
        return out

    def init_std_of(self, config, name: str, spec: Param) -> float:
        if spec.kind != "matrix":
            return 0.0
        if self.init_std is not None:
            return float(self.init_std(config, name, spec))
        return 0.02

    # -- building and syncing -------------------------------------------------------------

    def build_reference(self, config, like: nn.Module | None = None) -> nn.Module:
        """The model class (of `like`, or `build`) built from `config` with its parameters
        on the meta device (no memory, no init cost) and its buffers real, under the dtype
        of `like` as default dtype, as from_pretrained(dtype=...) builds it: buffers
        computed at construction (Gemma's embed_scale) then round the same way."""
        build = self.build or type(like)
        dtype = _dtype_of(like) if like is not None else torch.get_default_dtype()
        with _parameters_on_meta(), _default_dtype(dtype):
            return build(config)

    def apply_config(self, model: nn.Module, new_config) -> None:
        if self.config_in_place:
            for key, attr in self.config_keys.items():
                if key in DIM_KEYS:
                    setattr(model.config, attr, getattr(new_config, attr))
        else:
            model.config = new_config

    def sync(self, model: nn.Module, ref_old: nn.Module, ref_new: nn.Module,
             old_name: Callable[[str], str] | None = None) -> list[str]:
        """Copy to `model` every plain attribute and buffer that differs between the
        builds from the old and the new config. `old_name` maps a module's name in the
        grown model to its source's in the old one (deepen_: a block moved or copied from
        another index); by default names are kept. Returns what was updated."""
        changed = []
        old_mods, new_mods = dict(ref_old.named_modules()), dict(ref_new.named_modules())
        for name, mod in model.named_modules():
            a, b = old_mods.get(old_name(name) if old_name else name), new_mods.get(name)
            if a is None or b is None:
                continue
            for key, new_val in config_attributes(b).items():
                old_val = vars(a).get(key, _MISSING)
                if old_val is _MISSING or old_val == new_val:
                    continue
                setattr(mod, key, copy.deepcopy(new_val))
                changed.append(f"{name or type(model).__name__}.{key}")
            for key, buf in b._buffers.items():
                old_buf = a._buffers.get(key)
                if buf is None or buf.is_meta:
                    continue
                if old_buf is not None and old_buf.shape == buf.shape and torch.equal(old_buf, buf):
                    continue
                live = mod._buffers.get(key)
                dtype = live.dtype if live is not None and live.is_floating_point() == buf.is_floating_point() \
                    else buf.dtype
                device = live.device if live is not None else _device_of(model)
                mod._buffers[key] = buf.to(device=device, dtype=dtype)
                changed.append(f"{name or type(model).__name__}.{key} (buffer)")
        if self.finish is not None:
            self.finish(model)
        return changed


_MISSING = object()


def config_attributes(module: nn.Module) -> dict:
    """A module's public plain attributes (numbers, strings, sizes and their tuples): what
    a module derives from its config and Adapter.sync updates with the widths."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k not in ("training", "config") and _plain(v)}


def _plain(v) -> bool:
    if isinstance(v, (bool, int, float, str, type(None), torch.Size)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return False


def _dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _tied(model: nn.Module) -> bool:
    """Whether the LM head reads the input embedding's weight."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_in) and callable(get_out):
        try:
            emb, head = get_in(), get_out()
        except (NotImplementedError, AttributeError):
            emb = head = None
        if emb is not None and head is not None:
            return head.weight is emb.weight
    embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return bool(embs and heads and any(h.weight is embs[0].weight for h in heads))


class _EmptyOnMeta(torch.overrides.TorchFunctionMode):
    """torch.empty without a device makes meta tensors: the uninitialized storage that
    nn.Linear, nn.Embedding and the like allocate for their weights, so a reference
    build never allocates a full-size weight (buffers are computed by other ops and
    stay real). The in-place initializers of nn.init and of models' own init code are
    skipped on meta tensors: they have no values to fill, and running them costs most
    of a build (torch decomposes each one in Python)."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        elif getattr(func, "__name__", None) in _META_NO_OPS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))  # nn.init passes tensor=
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


# In-place ops that only write values (no shape, dtype or flag change): on a meta
# tensor they do nothing.
_META_NO_OPS = frozenset({"normal_", "uniform_", "zero_", "fill_", "trunc_normal_", "erfinv_", "mul_",
                          "add_", "sub_", "div_", "clamp_", "copy_", "exponential_", "random_",
                          "bernoulli_", "log_normal_", "cauchy_", "geometric_", "fill_diagonal_",
                          "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                          "orthogonal_", "ones_", "zeros_", "constant_", "eye_", "sparse_"})


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside go to the meta device; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        with _EmptyOnMeta():
            yield
    finally:
        nn.Module.register_parameter = register


# --- the registry --------------------------------------------------------------------

_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Let widen_/plan_growth grow the classes `adapter` names. A later registration
    for the same name replaces the earlier one, and wins over built-in families."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter needs a growkern.Adapter, got {type(adapter).__name__}")
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != adapter.name]
    _ADAPTERS.insert(0, adapter)
    return adapter


def adapters() -> list[str]:
    return [a.name for a in _ADAPTERS]


def _class_name(c) -> str:
    return c if isinstance(c, str) else f"{c.__module__}.{c.__qualname__}"


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter that grows `model`: the first registered one that names one of its
    classes (a class object or dotted name), else the first that matches a bare class
    name; TypeError naming the class and what is known."""
    ranked = [(a.match_rank(model), -i, a) for i, a in enumerate(_ADAPTERS)]
    rank, _, best = max(ranked, key=lambda r: r[:2], default=(0, 0, None))
    if rank:
        return best
    cls = type(model)
    # a class that shares a name with one growkern knows is not that class (nanoGPT's GPT)
    namesakes = [_class_name(c) for a in _ADAPTERS for c in a.classes
                 if _class_name(c).rpartition(".")[2] == cls.__name__]
    alike = (f"; {', '.join(namesakes)} {'is' if len(namesakes) == 1 else 'are'} another class of the same "
             f"name" if namesakes else "")
    known = sorted({_class_name(c) for a in _ADAPTERS for c in a.classes})
    raise TypeError(f"growkern does not know how to grow {cls.__name__} ({_class_name(cls)}{alike}); "
                    f"known: {', '.join(known)}. Describe its parameters with growkern.register_adapter "
                    f"(docs/models.md, 'Your own model')")


def adapter_for_config(config) -> Adapter | None:
    """The adapter whose config_class `config` is, or None."""
    for a in _ADAPTERS:
        if a.config_class is not None and isinstance(config, a.config_class):
            return a
    return None
