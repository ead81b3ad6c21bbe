"""What can grow: growkern's own GPT (gpt.py: the model and its adapter table) and the
Hugging Face families (hf_families.py: tables naming transformers' classes, no transformers
import). Importing this package registers their adapters; add a family with
growkern.register_adapter (docs/models.md)."""
from . import gpt, hf_families  # noqa: F401  registers the adapters, GPT's first
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
