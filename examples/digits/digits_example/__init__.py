"""A user's own project on dtrain: a small CNN on scikit-learn's 8x8 digits, with its own loss and configs.

``model.py`` holds the network, ``loss.py`` the loss, ``data.py`` writes the data files, and ``../conf`` the
Hydra options (``model=digits_cnn``, ``loss=smoothed_ce``) that dtrain finds through ``hydra.searchpath``.
See ../README.md.
"""
