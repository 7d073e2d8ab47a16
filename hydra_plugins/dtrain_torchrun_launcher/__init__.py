"""A Hydra launcher that runs each trial of a sweep as its own torchrun job (torch elastic_launch)."""
