"""The training loop and its parts: gradient norms and clipping, evaluation, logging."""
