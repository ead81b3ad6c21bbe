"""growkern: grow a trained dense causal LM in width, with its whole training state."""
from .adapter import Adapter, Param, Shape, adapter_for, adapters, register_adapter
from . import families  # noqa: F401  registers growkern.GPT and the Hugging Face families (imports no transformers)
from .backends import backends
from .model import GPT, GPTConfig
from .plan import DimMap, GrowthPlan, plan_growth
from .strategies import Strategy, register_strategy, strategies
from . import schedule
from . import widen as widen_module
from .widen import GrowthReport, widen_

__version__ = "0.1.0"
__all__ = ["Adapter", "Param", "Shape", "adapter_for", "adapters", "register_adapter", "schedule", "widen_module", "GPT", "GPTConfig", "DimMap", "GrowthPlan", "GrowthReport", "Strategy",
           "backends", "plan_growth", "register_strategy", "strategies", "widen_"]
