"""The subcommands beside training: ``dtrain NAME ...``, each a module with ``main(argv) -> exit status``.

The table names modules rather than importing them, so ``dtrain --help`` or a training run loads none of
them; ``dtrain.__main__`` imports the one asked for.
"""

SUBCOMMANDS = {
    "gradcheck": "dtrain.commands.gradcheck",  # the configured model's gradients against finite differences
    "report": "dtrain.report",  # an offline HTML (or PNG) report of finished runs (a package of its own)
    "lr-find": "dtrain.commands.lr_find",  # where gradient descent stops being stable
    "predict": "dtrain.commands.predict",  # a trained model's predictions for new rows
}
