"""tinygemma: pre-train Gemma 3 270M from scratch on TinyStories."""

from tinygemma.config import ModelConfig
from tinygemma.errors import UserError
from tinygemma.model import Gemma3

__version__ = "0.1.0"


def load(path, dtype=None, device=None):
    """A Gemma3 in eval mode from a tinygemma run or checkpoint directory, or a transformers Gemma 3 directory."""
    from tinygemma.checkpoint import load as _load

    return _load(path, dtype=dtype, device=device)


__all__ = ["Gemma3", "ModelConfig", "UserError", "load", "__version__"]
