"""tinygemma: pre-train Gemma 3 270M from scratch on TinyStories.

The names below are imported when first used (PEP 562), so that `import tinygemma` does not import torch: the
`tinygemma` command can then catch a Ctrl-C pressed while torch is still loading (see __main__.py).
"""

__version__ = "0.1.0"

_LAZY = {"Gemma3": "tinygemma.model", "ModelConfig": "tinygemma.config", "UserError": "tinygemma.errors"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    # A module by name (tinygemma.model after `import tinygemma` alone: a notebook's cell run after a restart
    # failed where an earlier cell had happened to import it)
    if name.isidentifier() and not name.startswith("_"):  # (not __main__, the command's entry point)
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # a module of ours that fails to import for a reason of its own
                raise
    raise AttributeError(f"module 'tinygemma' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too: Jupyter's completion of `tinygemma.` lists dir()
    return sorted({*globals(), *_LAZY})


def load(path, dtype=None, device=None):
    """A Gemma3 in eval mode from a tinygemma run or checkpoint directory, or a transformers Gemma 3 directory."""
    from tinygemma.checkpoint import load as _load

    return _load(path, dtype=dtype, device=device)


__all__ = ["Gemma3", "ModelConfig", "UserError", "load", "__version__"]
