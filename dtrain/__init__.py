"""dtrain: PyTorch-native distributed training configured by Hydra.

Kept light on purpose: every torchrun rank imports this at every (re)start, so nothing heavy
(Hydra, the trainer) is imported here.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``dtrain.load``: imported when first used, so ``import dtrain`` stays light."""
    if name == "load":
        from dtrain.model_file import load

        return load
    raise AttributeError(f"module 'dtrain' has no attribute {name!r}")


__all__ = ["__version__", "load"]
