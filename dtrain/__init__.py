"""dtrain: PyTorch-native distributed training configured by Hydra.

Kept light on purpose: every torchrun rank imports this at every (re)start, so nothing heavy
(Hydra, the trainer) is imported here.
"""

__version__ = "0.1.0"
