"""growkern: grow a trained dense causal LM in width and depth, with its whole training state.

The package has four wings (README, "Architecture"): the primitive (growkern.kernels),
the growth library (growkern.growth), what can grow (growkern.models) and the harness
around them (growkern.train, growkern.cli, growkern.studies). growkern.hf (the
transformers Trainer callback, saved Hugging Face directories) is imported on first
use, so `import growkern` does not import transformers.
"""
import importlib

from . import models  # noqa: F401  registers growkern.GPT and the Hugging Face families
from .growth import schedule
from .growth.adapter import Adapter, Param, Shape, adapter_for, adapters, register_adapter
from .growth.maps import DimMap, GrowthPlan
from .growth.plan import plan_growth
from .growth.strategies import Strategy, register_strategy, strategies
from .growth.deepen import deepen_
from .growth.widen import GrowthReport, widen_
from .kernels.backends import backends
from .models.gpt import GPT, GPTConfig

__version__ = "0.1.0"
__all__ = ["Adapter", "Param", "Shape", "adapter_for", "adapters", "register_adapter", "schedule", "GPT", "GPTConfig",
           "DimMap", "GrowthPlan", "GrowthReport", "Strategy", "backends", "plan_growth", "register_strategy",
           "strategies", "widen_", "deepen_", "select_warm_start", "hf"]

_LAZY = ("hf", "studies")  # modules with heavy imports (transformers; the studies' harness)


def __getattr__(name):  # PEP 562: growkern.hf works after a plain `import growkern`
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name == "select_warm_start":  # the selection imports the studies' statistics
        return importlib.import_module(".selection", __name__).select_warm_start
    raise AttributeError(f"module 'growkern' has no attribute {name!r}")
