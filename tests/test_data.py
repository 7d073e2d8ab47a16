"""Unit tests of the sharded loader and the data sets (synthetic and from files)."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch

from dtrain import config as C
from dtrain.data import DataSet, ShardedBatches, Split, build_dataset, shard_bounds
from dtrain.data.loader import epoch_permutation
from dtrain.errors import ConfigError, UserError

WORLD_SIZES = (1, 2, 3, 4)
ACCUMS = (1, 2)


def index_split(num: int) -> Split:
    """A split whose x holds each sample's own index, so a batch tells which samples it contains."""
    idx = torch.arange(num, dtype=torch.float64).unsqueeze(1)
    return Split(idx, 10 * idx)


def indices(x: torch.Tensor) -> list[int]:
    return [int(v) for v in x.reshape(-1).tolist()]


def all_shards(num: int, batch: int | None, world: int, accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """For each rank, the list of its steps, each step the flat indices of its micro-batches in order."""
    split = index_split(num)
    ranks = []
    for rank in range(world):
        loader = ShardedBatches(split, batch, rank, world, seed, accum)
        steps = []
        for micro in loader.epoch(epoch):
            assert len(micro) == accum
            flat: list[int] = []
            for x, y in micro:
                assert x.shape == (loader.micro_batch, 1)
                assert torch.equal(y, 10 * x)  # x and y are indexed together
                flat.extend(indices(x))
            steps.append(flat)
        ranks.append(steps)
    return ranks


# ---------------------------------------------------------------------------------------------
# ShardedBatches


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("accum", ACCUMS)
@pytest.mark.parametrize("num, batch", [(50, 24), (48, 24), (97, 48)])
def test_shards_disjoint_and_cover_prefix_of_permutation(num: int, batch: int, world: int, accum: int) -> None:
    seed, epoch = 7, 3
    ranks = all_shards(num, batch, world, accum, seed, epoch)
    steps = num // batch
    # Every rank runs the same number of steps: N // B.
    assert [len(r) for r in ranks] == [steps] * world
    every = [i for r in ranks for step in r for i in step]
    assert len(every) == len(set(every)), "a sample appears twice in one epoch"
    perm = epoch_permutation(num, seed, epoch).tolist()
    assert sorted(every) == sorted(perm[: steps * batch])
    # Each step's global batch is exactly the next B entries of the permutation.
    for k in range(steps):
        global_batch = [i for r in ranks for i in r[k]]
        assert len(global_batch) == batch
        assert set(global_batch) == set(perm[k * batch : (k + 1) * batch])


@pytest.mark.parametrize("accum", ACCUMS)
def test_global_batch_independent_of_world_size(accum: int) -> None:
    num, batch, seed = 50, 24, 11
    for epoch in (0, 1):
        reference = None
        for world in WORLD_SIZES:
            ranks = all_shards(num, batch, world, accum, seed, epoch)
            per_step = [sorted(i for r in ranks for i in r[k]) for k in range(num // batch)]
            if reference is None:
                reference = per_step
            assert per_step == reference, f"world_size={world} changes the global batches"


def test_full_batch_when_batch_size_is_none() -> None:
    num = 24
    loader = ShardedBatches(index_split(num), None, 0, 1, seed=0)
    assert loader.global_batch == num
    assert loader.steps_per_epoch == 1
    (micro,) = list(loader.epoch(0))
    assert sorted(indices(micro[0][0])) == list(range(num))


@pytest.mark.parametrize("seed", [0, 1, 123456789])
def test_epoch_permutation_deterministic_and_varies_by_epoch(seed: int) -> None:
    num = 100
    a = epoch_permutation(num, seed, 5)
    b = epoch_permutation(num, seed, 5)
    assert torch.equal(a, b)
    assert sorted(a.tolist()) == list(range(num))  # a permutation
    assert not torch.equal(a, epoch_permutation(num, seed, 6))
    assert not torch.equal(a, epoch_permutation(num, seed + 1, 5))


def test_loader_epochs_differ_and_repeat() -> None:
    split = index_split(40)
    loader = ShardedBatches(split, 8, 0, 2, seed=3)
    first = [indices(x) for micro in loader.epoch(0) for x, _ in micro]
    again = [indices(x) for micro in loader.epoch(0) for x, _ in micro]
    second = [indices(x) for micro in loader.epoch(1) for x, _ in micro]
    assert first == again
    assert first != second


def test_batch_larger_than_data_raises() -> None:
    with pytest.raises(ConfigError, match=r"batch_size=51\b") as info:
        ShardedBatches(index_split(50), 51, 0, 1, seed=0)
    assert "50" in str(info.value)


@pytest.mark.parametrize(
    "batch, world, accum",
    [(10, 4, 1), (10, 3, 1), (12, 4, 2), (9, 2, 1), (9, 1, 2)],
)
def test_batch_not_divisible_raises(batch: int, world: int, accum: int) -> None:
    assert batch % (world * accum)  # the case is what it claims to be
    with pytest.raises(ConfigError, match=rf"batch_size={batch}\b") as info:
        ShardedBatches(index_split(50), batch, 0, world, seed=0, grad_accum_steps=accum)
    assert str(world * accum) in str(info.value)


def test_full_batch_not_divisible_raises_naming_value() -> None:
    with pytest.raises(ConfigError, match=r"=49\b"):
        ShardedBatches(index_split(49), None, 0, 2, seed=0)


@pytest.mark.parametrize("num", [0, 1, 5, 7, 10, 11, 13, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 6])
def test_shard_bounds_partition(num: int, world: int) -> None:
    bounds = [shard_bounds(num, r, world) for r in range(world)]
    assert bounds[0][0] == 0
    assert bounds[-1][1] == num
    for (_, stop), (start, _) in itertools.pairwise(bounds):
        assert stop == start  # contiguous, no overlap, no gap
    sizes = [stop - start for start, stop in bounds]
    assert all(s >= 0 for s in sizes)
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == num


# ---------------------------------------------------------------------------------------------
# Synthetic data sets


def poly2d_formula(x: torch.Tensor, c: list[float]) -> torch.Tensor:
    x1, x2 = x[:, 0], x[:, 1]
    return (c[0] * x1 * x1 + c[1] * x1 + c[2] * x2 * x2 + c[3] * x2 + c[4]).unsqueeze(1)


def test_poly2d_sizes_default() -> None:
    data = build_dataset(C.Poly2dConfig(), seed=0)
    assert isinstance(data, DataSet)
    grid = C.Poly2dConfig().grid_size
    assert grid * grid == 900
    assert len(data.train) == 720
    assert len(data.val[""]) == 180
    assert data.task == "regression"
    assert data.num_inputs == 2 and data.num_outputs == 1
    assert data.train.y.shape == (720, 1)
    # The split is a partition of the grid.
    points = torch.cat([data.train.x, data.val[""].x])
    assert len({tuple(p) for p in points.tolist()}) == 900


def test_poly2d_clean_targets_follow_formula() -> None:
    coefficients = [0.5, -2.0, 3.0, 1.25, -0.75]
    cfg = C.Poly2dConfig(noise=0.0, coefficients=coefficients, grid_size=7, low=-1.0, high=2.0)
    data = build_dataset(cfg, seed=4)
    for split in (data.train, data.val[""]):
        torch.testing.assert_close(split.y, poly2d_formula(split.x, coefficients), rtol=1e-12, atol=1e-12)
    axis = {-1.0 + 3.0 * i / 6 for i in range(7)}
    values = {round(v, 9) for v in torch.cat([data.train.x, data.val[""].x]).reshape(-1).tolist()}
    assert values == {round(v, 9) for v in axis}


def test_poly2d_deterministic_per_seed() -> None:
    a, b, c = (build_dataset(C.Poly2dConfig(), seed=s) for s in (1, 1, 2))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.val[""].y, b.val[""].y)
    assert not torch.equal(a.train.y, c.train.y)


def test_poly1d_matches_polynomial() -> None:
    k = [0.5, -1.0, 2.0, 0.25]
    cfg = C.Poly1dConfig(degree=3, coefficients=k, noise=0.0, num_points=200, low=-2.0, high=1.0)
    data = build_dataset(cfg, seed=0)
    assert len(data.train) + len(data.val[""]) == 200
    assert len(data.val[""]) == round(0.2 * 200)
    for split in (data.train, data.val[""]):
        x = split.x
        assert ((x >= -2.0) & (x <= 1.0)).all()
        expected = k[0] + k[1] * x + k[2] * x**2 + k[3] * x**3
        torch.testing.assert_close(split.y, expected, rtol=1e-12, atol=1e-12)
    assert data.extras["coefficients"] == k


def test_poly1d_drawn_coefficients_deterministic() -> None:
    cfg = C.Poly1dConfig(degree=2, coefficients=None, num_points=50)
    a, b, c = (build_dataset(cfg, seed=s) for s in (3, 3, 4))
    assert a.extras["coefficients"] == b.extras["coefficients"]
    assert a.extras["coefficients"] != c.extras["coefficients"]
    assert len(a.extras["coefficients"]) == 3
    assert all(-1.0 <= v <= 1.0 for v in a.extras["coefficients"])


def test_sine_splits_ranges() -> None:
    cfg = C.SineConfig(num_points=1000, low=-1.0, high=1.5, outer_low=-3.0, outer_high=2.0, noise=0.0)
    data = build_dataset(cfg, seed=5)
    outer = data.val["outer"]
    assert len(outer) == round(cfg.outer_fraction * cfg.num_points)
    assert len(data.train) + len(data.val[""]) + len(outer) == cfg.num_points
    ox = outer.x
    assert ((ox < cfg.low) | (ox > cfg.high)).all()
    assert ((ox >= cfg.outer_low) & (ox <= cfg.outer_high)).all()
    # Both flanks are used.
    assert (ox < cfg.low).any() and (ox > cfg.high).any()
    for split in (data.train, data.val[""]):
        assert ((split.x >= cfg.low) & (split.x <= cfg.high)).all()
    for split in (data.train, data.val[""], outer):
        torch.testing.assert_close(split.y, torch.sin(split.x), rtol=1e-12, atol=1e-12)


def test_moons_two_long_classes() -> None:
    cfg = C.MoonsConfig(num_points=101)
    data = build_dataset(cfg, seed=0)
    assert data.task == "classification"
    assert data.num_classes == 2 and data.num_outputs == 2
    ys = torch.cat([data.train.y, data.val[""].y])
    assert data.train.y.dtype == torch.long and data.val[""].y.dtype == torch.long
    assert data.train.y.ndim == 1
    assert set(ys.tolist()) == {0, 1}
    assert int((ys == 0).sum()) == 101 // 2
    assert int((ys == 1).sum()) == 101 - 101 // 2
    # to() casts x but keeps class indices as long.
    moved = data.to(torch.device("cpu"), torch.float32)
    assert moved.train.x.dtype == torch.float32 and moved.train.y.dtype == torch.long


def test_moons_noise_free_on_half_circles() -> None:
    data = build_dataset(C.MoonsConfig(num_points=60, noise=0.0), seed=1)
    for split in (data.train, data.val[""]):
        top = split.x[split.y == 0]
        bottom = split.x[split.y == 1]
        torch.testing.assert_close(top.norm(dim=1), torch.ones(len(top), dtype=torch.float64))
        centre = torch.tensor([1.0, 0.5], dtype=torch.float64)
        torch.testing.assert_close((bottom - centre).norm(dim=1), torch.ones(len(bottom), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# File data


def file_cfg(path: object, **kwargs: object) -> C.FileDataConfig:
    return C.FileDataConfig(path=str(path), **kwargs)  # type: ignore[arg-type]


def gather(data: DataSet) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of train and val, sorted by the first feature, to compare with what was written."""
    x = torch.cat([data.train.x, data.val[""].x])
    y = torch.cat([data.train.y, data.val[""].y])
    order = torch.argsort(x[:, 0])
    return x[order], y[order]


def test_npz_round_trip(tmp_path) -> None:
    x = np.stack([np.arange(20, dtype=np.float64), np.linspace(-1, 1, 20)], axis=1)
    y = 3 * x[:, 0] - x[:, 1]
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    data = build_dataset(file_cfg(path), seed=0)
    assert data.task == "regression" and data.num_inputs == 2
    assert len(data.val[""]) == round(0.2 * 20)
    gx, gy = gather(data)
    assert gx.dtype == torch.float64
    torch.testing.assert_close(gx, torch.from_numpy(x))
    torch.testing.assert_close(gy, torch.from_numpy(y).unsqueeze(1))


def test_npz_classification(tmp_path) -> None:
    x = np.arange(12, dtype=np.float64)  # 1-D x becomes one feature
    y = np.arange(12) % 3
    path = tmp_path / "c.npz"
    np.savez(path, x=x, y=y)
    data = build_dataset(file_cfg(path, task="classification"), seed=0)
    assert data.num_inputs == 1
    assert data.num_classes == 3
    gx, gy = gather(data)
    assert gy.dtype == torch.long
    assert gy.tolist() == (np.arange(12) % 3).tolist()
    assert gx[:, 0].tolist() == list(range(12))


def test_csv_round_trip(tmp_path) -> None:
    rows = [(float(i), 0.5 * i - 1, 2.0 * i + 1) for i in range(10)]
    path = tmp_path / "d.CSV"  # the suffix is case-insensitive
    lines = ["a, target ,b"] + [f"{a},{t},{b}" for a, t, b in rows]
    path.write_text("\n".join(lines) + "\n")
    data = build_dataset(file_cfg(path, target="target", val_fraction=0.3), seed=1)
    assert data.num_inputs == 2  # the target column is removed from the features
    assert len(data.val[""]) == 3
    gx, gy = gather(data)
    torch.testing.assert_close(gx, torch.tensor([[a, b] for a, _, b in rows], dtype=torch.float64))
    torch.testing.assert_close(gy, torch.tensor([[t] for _, t, _ in rows], dtype=torch.float64))


def test_file_split_is_deterministic_per_seed(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(50.0), y=np.arange(50.0))
    a, b, c = (build_dataset(file_cfg(path), seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train.x, b.train.x)
    assert not torch.equal(a.train.x, c.train.x)


def assert_one_line_user_error(cfg: C.FileDataConfig, *fragments: str) -> None:
    with pytest.raises(UserError) as info:
        build_dataset(cfg, seed=0)
    message = str(info.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_file(tmp_path) -> None:
    assert_one_line_user_error(file_cfg(tmp_path / "nope.npz"), "nope.npz", "no such file")


def test_directory_is_not_a_file(tmp_path) -> None:
    assert_one_line_user_error(file_cfg(tmp_path), "is a directory without x.npy", "holding x.npy and y.npy")


def test_unknown_suffix(tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_text("{}")
    assert_one_line_user_error(file_cfg(path), "'.json'")


def test_missing_csv_column(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    assert_one_line_user_error(file_cfg(path, target="label"), "'label'", "a, b")


@pytest.mark.parametrize("suffix", ["npz", "csv"])
def test_nan_values(tmp_path, suffix: str) -> None:
    path = tmp_path / f"d.{suffix}"
    if suffix == "npz":
        np.savez(path, x=np.array([[1.0], [math.nan], [3.0]]), y=np.array([1.0, 2.0, 3.0]))
    else:
        path.write_text("x,y\n1,2\nnan,3\n4,5\n")
    assert_one_line_user_error(file_cfg(path), "NaN")


def test_nan_in_target(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([1.0, 2.0, 3.0]), y=np.array([1.0, math.nan, 3.0]))
    assert_one_line_user_error(file_cfg(path), "NaN")


def test_mismatched_lengths(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 2)), y=np.zeros(4))
    assert_one_line_user_error(file_cfg(path), "5 rows", "4")


def test_non_numeric_csv_cell(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("x,y\n1,2\nthree,4\n")
    assert_one_line_user_error(file_cfg(path), "d.csv:3: column 'x': 'three' is not a number")


def test_missing_npz_array(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros(3), target=np.zeros(3))
    assert_one_line_user_error(file_cfg(path), "no array 'y'; it has: x, target")


def test_corrupt_npz(tmp_path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"this is not a zip file")
    assert_one_line_user_error(file_cfg(path), "d.npz")


def test_classification_targets_must_be_indices(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros(3), y=np.array([0.0, 1.5, 1.0]))
    assert_one_line_user_error(file_cfg(path, task="classification"), "class indices")


# ---------------------------------------------------------------------------------------------
# Edge cases of user-supplied files and configs


def test_classification_rejects_multi_column_targets(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(4.0), y=np.array([[0, 1], [1, 0], [0, 1], [1, 0]]))
    assert_one_line_user_error(file_cfg(path, task="classification"), "d.npz")


def test_scalar_y_is_user_error(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros(3), y=np.float64(1.0))
    assert_one_line_user_error(file_cfg(path), "d.npz")


def test_non_utf8_csv_is_user_error(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"x,y\n\xff1,2\n3,4\n")
    assert_one_line_user_error(file_cfg(path), "d.csv")


def test_csv_with_only_target_column_is_user_error(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("y\n1\n2\n3\n")
    assert_one_line_user_error(file_cfg(path), "d.csv")


def test_empty_training_split_is_config_error() -> None:
    with pytest.raises(ConfigError):
        ShardedBatches(index_split(0), None, 0, 1, seed=0)


def test_truncated_npz_is_user_error(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((10, 2)), y=np.zeros(10))
    path.write_bytes(path.read_bytes()[:100])
    assert_one_line_user_error(file_cfg(path), "not a readable .npz")


def test_absurd_class_label_is_user_error(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 2)), y=np.array([0, 1, 0, 10**9]))
    assert_one_line_user_error(file_cfg(path, task="classification"), "class indices 0..K-1")


# ---------------------------------------------------------------------------------------------
# Class labels: what a user's file holds, checked before anything trains


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (
            [1, 2, 3, 1, 2, 3, 1, 2],
            "labels 1..3 (3 classes); dtrain expects class indices 0..K-1, here 0..2: subtract 1",
        ),
        ([0, 2, 5, 0, 2, 5, 0, 2], "labels 0, 2, 5 (3 classes); dtrain expects class indices 0..K-1, here 0..2"),
        ([i // 2 for i in range(24)], "the target has 12 distinct values in 24 rows: is it a regression target?"),
    ],
)
def test_labels_that_are_not_class_indices(tmp_path, labels: list[int], fragment: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(float(len(labels))), y=np.array(labels))
    assert_one_line_user_error(file_cfg(path, task="classification"), fragment)


def test_a_target_of_a_few_whole_numbers_without_a_task_warns(tmp_path, caplog) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(30.0), y=np.arange(30) % 3)
    # dtrain's logger stops propagating once a run has set up logging in this process: listen to it directly.
    logger = logging.getLogger("dtrain")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="dtrain"):
            data = build_dataset(file_cfg(path, task=None), seed=0)
        assert data.task == "regression"
        assert "set data.task=classification" in caplog.text and "0..2 (3 values)" in caplog.text
        caplog.clear()
        with caplog.at_level("WARNING", logger="dtrain"):
            build_dataset(file_cfg(path, task="regression"), seed=0)  # said outright: no warning
        assert caplog.text == ""
    finally:
        logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_csv_delimiters_are_recognised(tmp_path, delimiter: str) -> None:
    path = tmp_path / "d.csv"
    rows = [(i, 0.5 * i, 2 * i) for i in range(6)]
    body = "\n".join(delimiter.join(map(str, row)) for row in rows)
    path.write_bytes(("\ufeff" + delimiter.join(["a", "y", "b"]) + "\n" + body + "\n").encode())  # with a BOM
    data = build_dataset(file_cfg(path, val_fraction=0.5), seed=0)
    gx, gy = gather(data)
    assert gx.tolist() == [[a, b] for a, _, b in rows] and gy.reshape(-1).tolist() == [t for _, t, _ in rows]


def test_a_pandas_index_column_is_refused(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(",a,y\n0,1.0,2.0\n1,3.0,4.0\n2,5.0,6.0\n")
    assert_one_line_user_error(file_cfg(path), "the first column has no name", "to_csv(index=False)")


def test_the_summary_says_what_was_loaded() -> None:
    from dtrain.data.summary import data_summary as describe

    x = torch.arange(20.0).reshape(10, 2)
    y = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1, 2, 2])
    data = DataSet(Split(x[:8], y[:8]), {"": Split(x[8:], y[8:])}, task="classification", num_classes=3)
    line = describe(data, "/d/f.csv", world_size=2, global_batch=4)
    assert line == (
        "data: /d/f.csv: 8 train / 2 val rows (each rank: 2 of every 4-row batch, 1 val rows), 2 features, "
        "classification, 3 classes (train rows a class: 2-3)"
    )
    regression = DataSet(Split(x, torch.linspace(-1, 3, 10)[:, None]), {}, task="regression")
    assert describe(regression, "sine (generated)", 1, 10).endswith("regression, target in [-1, 3], mean 1")


# ---------------------------------------------------------------------------------------------
# Tables: Parquet, compressed CSV, chosen columns


def frame_rows(n: int = 30) -> dict[str, np.ndarray]:
    i = np.arange(n, dtype=np.float64)
    return {"id": i + 1000, "a": i, "b": np.sin(i), "y": 2 * i - 1}


@pytest.mark.parametrize("suffix", ["parquet", "csv.gz"])
def test_parquet_and_compressed_csv_read_as_the_csv(tmp_path, suffix: str) -> None:
    import pandas as pd

    frame = pd.DataFrame(frame_rows())
    frame.to_csv(tmp_path / "d.csv", index=False)
    path = tmp_path / f"d.{suffix}"
    frame.to_parquet(path, index=False) if suffix == "parquet" else frame.to_csv(path, index=False)
    args = {"drop": ["id"]}
    plain, other = (build_dataset(file_cfg(p, **args), seed=0) for p in (tmp_path / "d.csv", path))
    assert other.num_inputs == 2
    assert torch.equal(other.train.x, plain.train.x) and torch.equal(other.val[""].y, plain.val[""].y)


def test_features_and_drop_choose_the_input_columns(tmp_path) -> None:
    import pandas as pd

    path = tmp_path / "d.csv"
    pd.DataFrame(frame_rows()).to_csv(path, index=False)
    chosen = build_dataset(file_cfg(path, features=["b", "a"]), seed=0)
    gx, _ = gather(chosen)
    rows = frame_rows()
    # In the order data.features gives them; sorted by the first (b) by gather.
    expected = np.stack([rows["b"], rows["a"]], axis=1)
    torch.testing.assert_close(gx, torch.from_numpy(expected[np.argsort(expected[:, 0])]))
    dropped = build_dataset(file_cfg(path, drop=["id"]), seed=0)
    assert dropped.num_inputs == 2
    assert_one_line_user_error(file_cfg(path, features=["a", "c"]), "no column 'c'", "columns: id, a, b, y")
    assert_one_line_user_error(file_cfg(path, features=["a", "y"]), "lists the target column 'y'")


@pytest.mark.parametrize(
    ("write", "fragment"),
    [
        (lambda p: p.write_bytes(b"not parquet"), "not a readable .parquet file"),
        (lambda p: __import__("pandas").DataFrame({"a": ["x", "1"], "y": [1, 2]}).to_parquet(p), "column 'a' holds"),
    ],
)
def test_bad_parquet_is_one_line(tmp_path, write, fragment: str) -> None:
    path = tmp_path / "d.parquet"
    write(path)
    assert_one_line_user_error(file_cfg(path), fragment)


# ---------------------------------------------------------------------------------------------
# Memory-mapped .npy: read through a DataLoader, a batch of rows at a time


def write_npy(directory, rows: int, features: int = 4, classes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    x = np.arange(rows * features, dtype=np.float32).reshape(rows, features)
    y = (np.arange(rows) % classes) if classes else x.sum(axis=1)
    np.save(directory / "x.npy", x)
    np.save(directory / "y.npy", y)
    return x, y


def test_npy_directory_is_memory_mapped_and_split_as_a_table_would_be(tmp_path) -> None:
    from dtrain.data.dataset import DatasetSplit

    x, y = write_npy(tmp_path / "arrays", 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    mapped = build_dataset(file_cfg(tmp_path / "arrays"), seed=3)
    table = build_dataset(file_cfg(tmp_path / "d.npz"), seed=3)
    assert isinstance(mapped.train, DatasetSplit) and not mapped.in_memory
    assert isinstance(mapped.train.dataset.x, np.memmap)
    # The same rows in the same split as the .npz, read through the split's own rows.
    got_x, got_y = mapped.train.rows(0, len(mapped.train))
    torch.testing.assert_close(got_x, table.train.x)
    torch.testing.assert_close(got_y, table.train.y)
    # x.npy named directly finds y.npy beside it; classes are checked as a table's are.
    assert len(build_dataset(file_cfg(tmp_path / "arrays" / "x.npy"), seed=3).train) == 40
    write_npy(tmp_path / "classes", 40, classes=3)
    assert build_dataset(file_cfg(tmp_path / "classes", task="classification"), seed=0).num_classes == 3
    (tmp_path / "classes" / "y.npy").unlink()
    assert_one_line_user_error(file_cfg(tmp_path / "classes"), "no y.npy beside it", ".npy files there: x.npy")


def test_ranks_read_disjoint_rows_of_each_global_batch(tmp_path) -> None:
    from dtrain.data.dataloader import LoaderBatches

    write_npy(tmp_path / "arrays", 64, features=1)
    data = build_dataset(file_cfg(tmp_path / "arrays", val_fraction=0.0), seed=0)
    loaders = [LoaderBatches(data.train, 16, rank, 2, seed=5, grad_accum_steps=2) for rank in (0, 1)]
    memory = ShardedBatches(Split(*data.train.rows(0, 64)), 16, 0, 1, seed=5)
    for step, (whole, *ranks) in enumerate(zip(memory.epoch(1), *(b.epoch(1) for b in loaders), strict=True)):
        per_rank = [torch.cat([mx for mx, _ in micro]) for micro in ranks]
        assert all(len(m) == 2 and len(m[0][0]) == 4 for m in ranks)  # 2 micro-batches of 4 rows per rank
        # Rank 0 then rank 1 make exactly the global batch the in-memory loader gives one process.
        torch.testing.assert_close(torch.cat(per_rank), whole[0][0], msg=f"step {step}")
    assert loaders[0].steps_per_epoch == 4


def test_a_memory_mapped_file_larger_than_the_limit_trains_in_bounded_memory(tmp_path) -> None:
    """An epoch over a 160 MB x.npy must not grow the process's own (anonymous) resident memory by more than
    32 MB, a fifth of the file: the rows are the page cache's, which the kernel can drop, not the process's. (What
    does grow with the rows is the epoch's order, 8 bytes a row.)"""
    from dtrain.data.dataloader import LoaderBatches

    rows, features = 1_000_000, 40
    directory = tmp_path / "big"
    directory.mkdir()
    x = np.lib.format.open_memmap(directory / "x.npy", mode="w+", dtype=np.float32, shape=(rows, features))
    x[:] = 1.0
    x.flush()
    del x
    np.save(directory / "y.npy", np.zeros(rows, dtype=np.float32))
    limit = 32 * 2**20
    assert (directory / "x.npy").stat().st_size > 4 * limit
    data = build_dataset(file_cfg(directory, val_fraction=0.01), seed=0).to(torch.device("cpu"), torch.float32)
    batches = LoaderBatches(data.train, 25_000, 0, 1, seed=0)
    before, peak, seen = anonymous_rss(), 0, 0
    for micro in batches.epoch(0):
        seen += len(micro[0][0])
        peak = max(peak, anonymous_rss() - before)
    assert seen == batches.steps_per_epoch * 25_000 > 0.9 * rows
    assert peak < limit, f"anonymous resident memory grew by {peak / 2**20:.0f} MB"


def anonymous_rss() -> int:
    """This process's anonymous resident memory in bytes (Linux: RssAnon in /proc/self/status)."""
    for line in open("/proc/self/status"):  # noqa: SIM115 (a read of a few lines)
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


# ---------------------------------------------------------------------------------------------
# Standardisation: statistics of the training split, summed over rank shards


def test_standardizer_statistics_are_the_training_splits_whichever_ranks_sum_them() -> None:
    from dtrain.data.standardize import fit_standardizer

    gen = torch.Generator().manual_seed(0)
    x = 1e6 + torch.randn(101, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 1e-3, 0.0]).double()
    y = 300 + 50 * torch.randn(101, 1, generator=gen, dtype=torch.float64)
    split = Split(x, y)
    whole = fit_standardizer(split, targets=True)
    torch.testing.assert_close(whole.x_mean, x.mean(0), rtol=1e-15, atol=0)
    # A spread of 1e-3 at 1e6 survives (to the precision x itself holds it: 1e-10 / 1e-3), where a plain sum of
    # squares would cancel it away (1e12 - 1e12): the sums are of differences from the first row.
    torch.testing.assert_close(whole.x_std[:2], x[:, :2].std(0, unbiased=False), rtol=1e-6, atol=0)
    assert whole.x_std[2] == 1.0  # a constant feature keeps scale 1: it becomes 0, not NaN
    torch.testing.assert_close(whole.y_std, y.std(0, unbiased=False), rtol=1e-12, atol=0)
    # Three ranks' shards, each summed alone, then added up: what the all-reduce gives every rank.
    shard_sums: list[torch.Tensor] = []
    for rank in range(3):
        fit_standardizer(split, True, rank, 3, reduce=lambda t: shard_sums.append(t.clone()) or t)
    total = torch.stack(shard_sums).sum(0)
    reduced = fit_standardizer(split, True, 0, 3, reduce=lambda t: total)
    for name in ("x_mean", "x_std", "y_mean", "y_std"):
        torch.testing.assert_close(getattr(reduced, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    # Applied: the training split has mean 0 and std 1; classes stay class indices.
    train = whole.apply(DataSet(split, {}, task="regression")).train
    torch.testing.assert_close(train.x[:, :2].mean(0), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(train.y.std(0, unbiased=False), torch.ones(1, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(whole.untargets(train.y), y, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    ("choice", "inputs", "target"), [(True, True, True), ("features", True, False), (False, False, False)]
)
def test_data_standardize_chooses_what_is_scaled(tmp_path, choice: object, inputs: bool, target: bool) -> None:
    from dtrain.data.registry import build_training_data

    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(40.0).reshape(20, 2) * 10, y=np.arange(20.0) + 100)
    raw = build_dataset(file_cfg(path), seed=0)
    data, standardizer = build_training_data(file_cfg(path, standardize=choice), seed=0)
    assert (standardizer is not None) == inputs
    assert torch.equal(data.train.x, raw.train.x) != inputs
    assert torch.equal(data.train.y, raw.train.y) != target
    if standardizer is not None:
        assert (standardizer.y_mean is not None) == target


def test_dataloader_workers_leave_stop_signals_to_training_and_end_with_it(tmp_path) -> None:
    """torchrun and SLURM signal every process of a job: a worker that got SIGTERM keeps reading (the training
    process decides where to stop and needs its batches until the checkpoint), and no worker outlives close()."""
    import multiprocessing
    import os
    import signal

    from dtrain.data.dataloader import LoaderBatches

    write_npy(tmp_path / "arrays", 64, features=2)
    data = build_dataset(file_cfg(tmp_path / "arrays", val_fraction=0.0), seed=0)
    batches = LoaderBatches(data.train, 8, 0, 1, seed=0, num_workers=2)
    epoch = batches.epoch(0)
    next(epoch)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR2)
    assert len(list(epoch)) == 7  # the rest of the epoch, read by the signalled workers
    batches.epoch(1)
    next(batches.epoch(1))
    batches.close()
    assert not multiprocessing.active_children()
