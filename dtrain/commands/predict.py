"""``dtrain predict RUN_DIR [data overrides] --out FILE``: a trained model's predictions for new rows.

The run's own ``config.yaml`` says where its data came from; ``data.*`` overrides point it elsewhere
(``data.path=new.csv``). For a file, every row is predicted (a target column, if there, is left out); for a
generated data set, its validation split. Under torchrun each rank predicts its share of the rows and rank 0
writes them all, in order. Classification writes each row's class and every class's probability; regression
its predicted value(s). A model trained on standardised data predicts in the data's own units, and one trained
with ``data.labels=remap`` gives the file's own labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain import checkpoint, dist
from dtrain.atomic import write_atomic
from dtrain.config import Config, load
from dtrain.data import build_dataset, shard_bounds
from dtrain.errors import ConfigError, UserError
from dtrain.model_file import TrainedModel, read_model

FORMATS = (".csv", ".npz")


def run_dir_of(source: Path) -> Path:
    """The run directory of ``source``: itself, the directory of its model file, or the run above a checkpoint
    (``checkpoints/step-N.pt``, or a sharded checkpoint's ``checkpoints/step-N`` directory)."""
    is_checkpoint = (source / checkpoint.SHARDED_MARK).is_file()
    run_dir = source if source.is_dir() and not is_checkpoint else source.parent
    return run_dir.parent if run_dir.name == checkpoint.DIR_NAME else run_dir


def run_config(source: Path, overrides: list[str]) -> Config:
    """The run's ``config.yaml`` with ``data.*`` overrides applied, checked as training checks it. A model file
    without its run directory's ``config.yaml`` is read with the defaults and the file that ``data.path`` names."""
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ConfigError(f"dtrain predict takes data.* overrides (e.g. data.path=new.csv), not {bad[0]!r}")
    run_dir = run_dir_of(source)
    path = run_dir / "config.yaml"
    if not path.is_file():
        if source.is_file() and any(o.startswith("data.path=") for o in overrides):
            from dtrain.compose import compose_config

            return compose_config(["data=file", *overrides])
        raise UserError(
            f"{run_dir} has no config.yaml: give a dtrain run directory, or a model file with data.path=..."
        )
    try:
        saved = OmegaConf.load(path)
        given = OmegaConf.from_dotlist(overrides)
        if OmegaConf.select(given, "data.path") is not None and saved.data.get("name") != "file":
            saved.data = {"name": "file"}  # a generated data set's run, asked about a file: the file's section
        merged = OmegaConf.merge(saved, given)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{overrides}: {str(exc).splitlines()[0]}") from None
    return load(merged)


def inputs(config: Config, features: list[str] | None = None) -> torch.Tensor:
    """The rows to predict, in float64 on the CPU: a file's every row (a table's ``features``, by name, in the
    order the model was trained on them), or a generated set's validation split."""
    if config.data.name == "file":
        from dtrain.data.files import read_features

        cfg = config.data if features is None else dataclasses.replace(config.data, features=features, drop=[])
        return torch.as_tensor(read_features(cfg), dtype=torch.float64)
    data = build_dataset(config.data, config.seed)
    split = data.val.get("", data.train)
    return split.head(len(split))[0]


def predict_rows(trained: TrainedModel, x: torch.Tensor, chunk: int = 4096) -> dict[str, np.ndarray]:
    """The model's predictions for ``x``: ``class`` and ``probabilities``, or ``prediction``."""
    outputs = []
    with torch.no_grad():
        for lo in range(0, len(x), chunk):
            outputs.append(trained.module(x[lo : lo + chunk]).cpu())  # in the model's own dtype
    output = torch.cat(outputs) if outputs else torch.empty(0, trained.sizes.num_outputs)
    if trained.task == "classification":
        probabilities = trained.loss.probabilities(output)
        index = probabilities.argmax(dim=1).numpy()
        labels = trained.preprocessing.get("classes")  # data.labels=remap's labels
        return {"class": index if labels is None else np.asarray(labels)[index], "probabilities": probabilities.numpy()}
    return {"prediction": output.reshape(len(output), -1).numpy()}


def file_bytes(columns: dict[str, np.ndarray], suffix: str) -> bytes:
    """The predictions as a ``.npz`` (the arrays as they are) or a ``.csv`` (one column per value)."""
    buffer = io.BytesIO()
    if suffix == ".npz":
        np.savez(buffer, **columns)
        return buffer.getvalue()
    names, blocks = [], []
    for name, array in columns.items():
        block = array.reshape(len(array), -1)
        if block.shape[1] == 1 and name != "probabilities":
            names.append(name)
        else:
            names += [f"{'prob' if name == 'probabilities' else name}_{k}" for k in range(block.shape[1])]
        blocks.append(block)
    table = np.concatenate(blocks, axis=1)
    # %.17g round-trips every float64, and writes a whole-number class as an integer.
    formats = ["%.17g"] * len(names)
    text = io.StringIO()
    np.savetxt(text, table, delimiter=",", header=",".join(names), comments="", fmt=formats)
    return text.getvalue().encode()


def main(argv: list[str]) -> int:
    """``dtrain predict RUN_DIR [--best] [--out FILE] [--device D] [data.*=...]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="dtrain predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory, its model file, or a checkpoint")
    parser.add_argument("--best", action="store_true", help="the best model (model_best.pt) rather than the final one")
    parser.add_argument(
        "--out", type=Path, default=Path("predictions.csv"), help=".csv or .npz (default predictions.csv)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    args, overrides = parser.parse_known_args(argv)
    if args.out.suffix.lower() not in FORMATS:
        raise UserError(f"--out {args.out}: unsupported suffix {args.out.suffix!r}; use .csv or .npz")
    if not args.out.parent.is_dir():
        raise UserError(f"--out {args.out}: no directory {args.out.parent} to write it in")
    if not args.run_dir.exists():
        raise UserError(f"{args.run_dir}: no such run directory or model file")
    run_dir = run_dir_of(args.run_dir)
    if args.best and run_dir != args.run_dir:
        raise UserError(f"--best picks model_best.pt in a run directory; {args.run_dir} is not one: drop --best")
    config = run_config(args.run_dir, overrides)
    env = dist.setup(args.device, config.dist.backend, config.dist.timeout_s, config.dist.checkpoint_timeout_s)
    try:
        trained = read_model(args.run_dir, args.best, env.device)
        # The columns the model was trained on, by name, unless the user names them (a file with other headers).
        named = any(o.startswith(("data.features=", "data.drop=")) for o in overrides)
        x = inputs(config, None if named else trained.preprocessing.get("features"))
        values = int(torch.Size(x.shape[1:]).numel())  # a row's input values (C*H*W for images), as num_inputs
        if values != trained.sizes.num_inputs:
            raise UserError(
                f"{config.data.name} data has {values} input value(s) a row but the model was trained on "
                f"{trained.sizes.num_inputs}: give it the same features"
            )
        start, stop = shard_bounds(len(x), env.rank, env.world_size)
        mine = predict_rows(trained, x[start:stop].to(env.device, trained.dtype))
        parts = dist.gather_to_main(mine, env)
        if parts is not None:
            columns = {name: np.concatenate([part[name] for part in parts]) for name in mine}
            write_atomic(args.out, file_bytes(columns, args.out.suffix.lower()))
            from_checkpoint = checkpoint.DIR_NAME in (args.run_dir.parent.name, args.run_dir.name)
            which = f"step {trained.record['step']}" if from_checkpoint else "best" if args.best else "final"
            print(f"predictions: {len(x)} rows from the {which} model of {run_dir} -> {args.out}")
        dist.barrier(env)
    finally:
        dist.teardown(env)
    return 0
