"""A user's own data (``data._target_``, defined in tests/user_data.py outside the package): tensors on the in-memory
path, Datasets through a DataLoader, and every promise the in-memory path makes kept on the DataLoader path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import dtrain
from tests.conftest import assert_ok, main_in_process, run_dtrain
from tests.test_user_models import assert_same_state, one_line_refusal, state

DATA = "data._target_=tests.user_data"
# float64, mini-batches of 16 of 160 training rows: 10 steps an epoch, so step 15 is mid-epoch.
TRAIN = ("model=mlp", "model.hidden=[8]", "trainer.precision=float64", "trainer.batch_size=16", "optim=adam")


def test_tensors_and_a_dataset_of_the_same_rows_train_alike(tmp_path: Path) -> None:
    # The same rows as tensors (in memory) and as a Dataset read by two worker processes: the same batches,
    # so the same weights and metrics.
    args = (*TRAIN, "trainer.max_steps=25")
    tensors = assert_ok(run_dtrain(tmp_path / "tensors", f"{DATA}.tensors", *args))
    dataset = assert_ok(run_dtrain(tmp_path / "dataset", f"{DATA}.dataset", "data.num_workers=2", *args))
    assert_same_state(state(dataset.run_dir), state(tensors.run_dir))
    assert dataset.metrics["val/loss"] == tensors.metrics["val/loss"]
    assert "160 train / 40 val rows, 3 features, regression, read through a DataLoader" in dataset.stdout
    assert "160 train / 40 val rows, 3 features, regression, target in" in tensors.stdout
    assert "_target_: tests.user_data.dataset" in (dataset.run_dir / "config.yaml").read_text()


def test_the_users_own_validation_rows_and_classes(tmp_path: Path) -> None:
    # (x, y, x_val, y_val) and (train, val) Datasets: the user's split, not data.val_fraction's.
    args = (*TRAIN, "trainer.max_steps=10", "data.val_fraction=0.5")
    pairs = assert_ok(run_dtrain(tmp_path / "pairs", f"{DATA}.tensors_with_val", *args))
    sets = assert_ok(run_dtrain(tmp_path / "sets", f"{DATA}.datasets", *args))
    assert "160 train / 40 val rows" in pairs.stdout and "160 train / 40 val rows" in sets.stdout
    assert sets.metrics["val/loss"] == pairs.metrics["val/loss"]
    # torch's TensorDataset, read a batch at a time rather than row by row: the same batches again.
    tensor_sets = assert_ok(run_dtrain(tmp_path / "tensor_sets", f"{DATA}.tensor_datasets", *args))
    assert_same_state(state(tensor_sets.run_dir), state(sets.run_dir))
    # Integer targets are classes; images keep their shape, and a torchvision-style `classes` names the classes.
    labels = assert_ok(run_dtrain(tmp_path / "labels", f"{DATA}.tensors", "data.classes=3", *args))
    assert "3 classes" in labels.stdout and "val/accuracy" in labels.metrics
    images = (f"{DATA}.images", "model._target_=tests.user_data.flat_linear", "trainer.max_steps=30")
    run = assert_ok(run_dtrain(tmp_path / "images", *images, "trainer.batch_size=16", "data.num_workers=1"))
    # A pandas DataFrame and Series, as a user with a table returns them.
    table = assert_ok(run_dtrain(tmp_path / "frame", f"{DATA}.frame", *args))
    assert "100 train / 100 val rows, 3 features, regression" in table.stdout  # data.val_fraction=0.5
    encoded = assert_ok(run_dtrain(tmp_path / "dummies", f"{DATA}.dummies_frame", *args))  # bool columns are numbers
    assert "3 features, regression" in encoded.stdout
    assert "inputs of shape 1x6x6, classification, 2 classes, read through a DataLoader" in run.stdout
    assert run.metrics["val/accuracy"] > 0.9
    # Two features, regression, figures on: the model's surface is drawn for data in memory only, not for a
    # Dataset (drawing its points would read it whole); the run goes on without it.
    figures = ("data.features=2", "trainer.figures=true")
    drawn = assert_ok(run_dtrain(tmp_path / "drawn", f"{DATA}.dataset", *figures, *args))
    # dtrain report on it: the curves, and a note in the model figure's place saying why there is none.
    code, _, err = main_in_process("report", str(drawn.run_dir))
    assert code == 0, err
    assert "its rows are read through a DataLoader" in (drawn.run_dir / "report.html").read_text()


def test_a_crash_mid_epoch_on_the_dataloader_path_resumes_exactly(tmp_path: Path) -> None:
    # Checkpoints every 5 steps, a crash after step 17: the resumed run starts at step 15, mid-epoch, with the
    # sampler at that step and the worker seeds of that epoch.
    args = (f"{DATA}.dataset", "data.num_workers=2", *TRAIN, "trainer.max_steps=30", "checkpoint.every_n_steps=5")
    whole = assert_ok(run_dtrain(tmp_path / "whole", *args))
    crashed = run_dtrain(tmp_path / "run", *args, "fault.kind=exit", "fault.step=17")
    assert crashed.returncode != 0
    resumed = assert_ok(run_dtrain(tmp_path / "run", *args))
    assert "resumed from" in resumed.stdout and "step 15" in resumed.stdout
    assert_same_state(state(resumed.run_dir), state(whole.run_dir))
    assert resumed.metrics["val/loss"] == whole.metrics["val/loss"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ((f"{DATA}.not_data",), ["returned a str", "it must return (x, y)"]),
        ((f"{DATA}.nowhere",), ["module tests.user_data has no 'nowhere'"]),
        ((f"{DATA}.tensors", "data.rowz=3"), ["unexpected keyword argument 'rowz'", "it takes: rows, features"]),
        ((f"{DATA}.mismatched",), ["x, y must have one row per sample", "[10, 3] and [9]"]),
        ((f"{DATA}.labels_from_one",), ["labels 1..3 (3 classes)", "subtract 1"]),
        ((f"{DATA}.datasets", "data.classes=3"), ["needs its number of classes", "data.num_classes=K"]),
        ((f"{DATA}.unpaired",), ["items must be (input, target) pairs", "item 0 is a Tensor"]),
        ((f"{DATA}.dataset", "population.size=2"), ["a population", "needs the data in memory"]),
        ((f"{DATA}.tensors", "data.num_workers=-1"), ["data.num_workers=-1"]),
        ((f"{DATA}.text_frame",), ["x has columns that are not numbers (city)", "get_dummies"]),
        ((f"{DATA}.stream",), ["returned an IterableDataset", "map-style Dataset"]),
        ((f"{DATA}.narrow_val",), ["validation rows have inputs [2]", "training rows [3]"]),
        ((f"{DATA}.tensors", "data.rows=2", "data.val_fraction=0.75"), ["the training split is empty"]),
    ],
)
def test_bad_user_data_is_refused_in_one_line(tmp_path: Path, args: tuple[str, ...], fragments: list[str]) -> None:
    one_line_refusal(run_dtrain(tmp_path / "run", *args, *TRAIN), *fragments)


def test_the_data_section_keeps_dtrains_own_keys_apart_from_the_arguments() -> None:
    from dtrain.compose import compose_config as compose
    from dtrain.config import UserDataConfig, section_plain

    config = compose([f"{DATA}.tensors", "data.rows=50", "data.val_fraction=0.1", "data.num_workers=3"])
    assert isinstance(config.data, UserDataConfig)
    assert config.data.args == {"rows": 50}
    assert (config.data.val_fraction, config.data.num_workers, config.data.task) == (0.1, 3, None)
    assert section_plain(config.data) == {
        "_target_": "tests.user_data.tensors",
        "rows": 50,
        "val_fraction": 0.1,
        "task": None,
        "num_classes": None,
        "num_workers": 3,
        "standardize": False,
    }


# ---------------------------------------------------------------------------------------------------------------
# Files: standardisation that travels with the model; memory-mapped arrays on two ranks


def write_table(path: Path, rows: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """A regression in large units, as real tables come: features near 1000 and 0.001, the target near 5000."""
    gen = np.random.default_rng(0)
    x = np.stack([1000 + 50 * gen.standard_normal(rows), 0.001 * gen.standard_normal(rows)], axis=1)
    y = 5000 + 2 * (x[:, 0] - 1000) + 30000 * x[:, 1] + gen.standard_normal(rows)
    lines = ["size,ratio,price"] + [f"{a:.17g},{b:.17g},{t:.17g}" for (a, b), t in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return x, y


def test_standardisation_is_saved_and_predictions_come_back_in_the_users_units(tmp_path: Path) -> None:
    from dtrain.data.dataset import split_rows
    from dtrain.data.standardize import Standardized

    x, y = write_table(tmp_path / "prices.csv")
    args = ("data=file", f"data.path={tmp_path / 'prices.csv'}", "data.target=price", *TRAIN, "trainer.max_steps=150")
    run = assert_ok(run_dtrain(tmp_path / "run", *args, "optim.lr=0.02"))
    assert "standardized: inputs and target (mean " in run.stdout
    # The statistics are the training split's (the rows dtrain held out are not in them).
    train_rows = split_rows(300, 0.2, torch.Generator().manual_seed(0))[0].numpy()
    saved = torch.load(run.run_dir / "model.pt", weights_only=True)["preprocessing"]["standardize"]
    np.testing.assert_allclose(saved["x_mean"].numpy(), x[train_rows].mean(0), rtol=1e-12)
    np.testing.assert_allclose(saved["x_std"].numpy(), x[train_rows].std(0), rtol=1e-9)
    np.testing.assert_allclose(saved["y_mean"].numpy(), [y[train_rows].mean()], rtol=1e-12)
    # dtrain.load wraps the model with them: raw rows in, prices out.
    model = dtrain.load(run.run_dir)
    assert isinstance(model, Standardized)
    with torch.no_grad():
        by_hand = model.model(torch.from_numpy((x - saved["x_mean"].numpy()) / saved["x_std"].numpy()))
        by_hand = by_hand.numpy().ravel() * float(saved["y_std"]) + float(saved["y_mean"])
    code, _, err = main_in_process("predict", str(run.run_dir), "--out", str(tmp_path / "p.npz"))
    assert code == 0, err
    predicted = np.load(tmp_path / "p.npz")["prediction"].ravel()
    np.testing.assert_allclose(predicted, by_hand, rtol=1e-12)
    # A new file with its columns in another order: picked by name, as the model was trained on them.
    columns = (tmp_path / "prices.csv").read_text().splitlines()
    swapped = ["ratio,size"] + [",".join(reversed(line.split(",")[:2])) for line in columns[1:]]
    (tmp_path / "swapped.csv").write_text("\n".join(swapped) + "\n")
    out = tmp_path / "swapped.npz"
    code, _, err = main_in_process(
        "predict", str(run.run_dir), f"data.path={tmp_path / 'swapped.csv'}", "--out", str(out)
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out)["prediction"].ravel(), predicted)
    # In the user's units, and trained: the validation loss (in standard units) times the target's variance is
    # the mean squared error of the predictions, in prices squared, over the held-out rows.
    val_rows = split_rows(300, 0.2, torch.Generator().manual_seed(0))[1].numpy()
    mse = np.mean((predicted[val_rows] - y[val_rows]) ** 2)
    assert mse == pytest.approx(run.metrics["val/loss"] * float(saved["y_std"]) ** 2, rel=1e-9)
    assert mse < 0.05 * y.var()


@pytest.mark.multiprocess
def test_two_ranks_read_memory_mapped_arrays_and_agree_on_the_statistics(tmp_path: Path) -> None:
    # x.npy and y.npy memory-mapped, read by a worker per rank; the standardisation's sums reduced across the
    # ranks' shards: the same statistics, batches and weights as one process.
    gen = np.random.default_rng(1)
    x = (100 + 10 * gen.standard_normal((400, 3))).astype(np.float32)
    (tmp_path / "arrays").mkdir()
    np.save(tmp_path / "arrays" / "x.npy", x)
    np.save(tmp_path / "arrays" / "y.npy", (x @ np.array([1.0, -2.0, 0.5]) + 7).astype(np.float32))
    args = ("data=file", f"data.path={tmp_path / 'arrays'}", "data.num_workers=1", *TRAIN, "trainer.max_steps=30")
    one = assert_ok(run_dtrain(tmp_path / "one", *args))
    two = assert_ok(run_dtrain(tmp_path / "two", *args, nproc=2))
    assert_same_state(state(two.run_dir), state(one.run_dir), tol=1e-10)
    stats = [torch.load(r.run_dir / "model.pt", weights_only=True)["preprocessing"]["standardize"] for r in (one, two)]
    for name, value in stats[0].items():
        torch.testing.assert_close(stats[1][name], value, rtol=1e-12, atol=0)
    assert two.metrics["val/loss"] == pytest.approx(one.metrics["val/loss"], abs=1e-12)
    assert "320 train / 80 val rows" in two.stdout and "each rank: 8 of every 16-row batch" in two.stdout


def test_the_split_is_saved_the_path_resolved_and_changed_data_not_resumed(tmp_path: Path) -> None:
    from dtrain.data.dataset import split_rows

    write_table(tmp_path / "prices.csv", rows=100)
    relative = os.path.relpath(tmp_path / "prices.csv")  # as a user types it, from where they stand
    args = ("data=file", f"data.path={relative}", "data.target=price", *TRAIN, "trainer.max_steps=10")
    run = assert_ok(run_dtrain(tmp_path / "run", *args))
    # Resolved in config.yaml: predict, report or resume from another directory find the same file.
    assert f"path: {tmp_path / 'prices.csv'}" in (run.run_dir / "config.yaml").read_text()
    # The split, as the source's row numbers: validation can be reproduced outside dtrain.
    with np.load(run.run_dir / "split.npz") as split:
        _, val = split_rows(100, 0.2, torch.Generator().manual_seed(0))
        np.testing.assert_array_equal(split["val"], val.numpy())
        assert sorted([*split["train"], *split["val"]]) == list(range(100))
    # The checkpoint's manifest names the data it trained on.
    manifest = json.loads((run.run_dir / "checkpoints" / "latest").read_text())
    assert manifest["data_fingerprint"].startswith(f"{tmp_path / 'prices.csv'}: ")
    # The file changes under the run: resuming it is refused, by name, until the user says the change is meant.
    write_table(tmp_path / "prices.csv", rows=101)
    refused = run_dtrain(tmp_path / "run", *args)
    assert refused.returncode == 2, refused.stderr
    assert "was saved training on other data: then " in refused.stderr and "prices.csv: " in refused.stderr
    assert "checkpoint.allow_changes=[data.fingerprint]" in refused.stderr
    resumed = assert_ok(run_dtrain(tmp_path / "run", *args, "checkpoint.allow_changes=[data.fingerprint]"))
    assert "(changed: data.fingerprint)" in resumed.stdout


def test_labels_of_any_values_are_renumbered_when_asked_and_predicted_back(tmp_path: Path) -> None:
    gen = np.random.default_rng(2)
    x = gen.standard_normal((120, 2))
    labels = np.array([3, 7, 9])[(x[:, 0] > -0.4).astype(int) + (x[:, 0] > 0.4).astype(int)]
    path = tmp_path / "grades.csv"
    path.write_text("a,b,grade\n" + "".join(f"{a:.17g},{b:.17g},{g}\n" for (a, b), g in zip(x, labels, strict=True)))
    args = ("data=file", f"data.path={path}", "data.target=grade", "data.task=classification", *TRAIN)
    refused = run_dtrain(tmp_path / "refused", *args)
    one_line_refusal(refused, "labels 3, 7, 9 (3 classes)", "renumber them, or add data.labels=remap")
    run = assert_ok(run_dtrain(tmp_path / "run", *args, "data.labels=remap", "trainer.max_steps=200", "optim.lr=0.05"))
    assert "3 classes" in run.stdout and run.metrics["val/accuracy"] > 0.8
    code, _, err = main_in_process("predict", str(run.run_dir), "--out", str(tmp_path / "p.csv"))
    assert code == 0, err
    predicted = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)[:, 0]
    assert set(predicted.tolist()) <= {3.0, 7.0, 9.0} and np.mean(predicted == labels) > 0.8
