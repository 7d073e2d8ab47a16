"""The evaluation figures: which picture each data set gets, and that it shows the model and the data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.contour import ContourSet

from dtrain import config as C
from dtrain.data import DataSet, Split, build_dataset
from dtrain.train.figures import MAX_POINTS, figure_to_rgb, model_figures
from tests.conftest import REPO


def regression_predict(x: torch.Tensor) -> torch.Tensor:
    """A stand-in model: the sum of the inputs' sines, [N, 1]."""
    return torch.sin(x).sum(dim=1, keepdim=True)


def sign_of_x0(x: torch.Tensor) -> torch.Tensor:
    """Two logits that make class 1 win exactly where x0 > 0 (the margin 2*x0 is linear in x0)."""
    return torch.stack([-x[:, 0], x[:, 0]], dim=1)


def only_axes(fig):
    assert len(fig.axes) == 1
    return fig.axes[0]


def scattered(ax) -> int:
    """How many data points the axes' scatter plots hold."""
    return sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))


def span_bounds(patch) -> tuple[float, float]:
    """The x extent of an axvspan in data coordinates (a Rectangle or a Polygon, depending on the version)."""
    verts = patch.get_patch_transform().transform(patch.get_path().vertices)
    return float(verts[:, 0].min()), float(verts[:, 0].max())


def all_x(data: DataSet, column: int = 0) -> torch.Tensor:
    return torch.cat([data.train.x[:, column], *(s.x[:, column] for s in data.val.values())])


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = "import sys, dtrain.train.figures; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_poly2d_gets_the_surface_with_every_point_over_the_data_square() -> None:
    data = build_dataset(C.Poly2dConfig(grid_size=12), seed=0)
    # A constant far above the data: the z axis can only reach it if the surface plots the model.
    figs = model_figures(lambda x: torch.full((len(x), 1), 50.0, dtype=x.dtype), data)
    assert set(figs) == {"figures/surface"}
    ax = only_axes(figs["figures/surface"])
    assert ax.name == "3d"
    assert scattered(ax) == 12 * 12  # train + val, all of them (under the subsampling limit)
    assert ax.get_zlim()[1] >= 50.0
    assert min(d.y.min() for d in [data.train, *data.val.values()]) >= ax.get_zlim()[0]
    for lim, column in ((ax.get_xlim(), 0), (ax.get_ylim(), 1)):
        x = all_x(data, column)
        assert lim[0] < float(x.min()) and float(x.max()) < lim[1]


def test_sine_gets_the_extrapolation_picture_with_the_training_range_shaded() -> None:
    data = build_dataset(C.SineConfig(num_points=300), seed=1)
    assert "outer" in data.val
    figs = model_figures(regression_predict, data)
    assert set(figs) == {"figures/extrapolation"}
    ax = only_axes(figs["figures/extrapolation"])
    assert "Extrapolation" in ax.get_title()

    (shade,) = ax.patches
    lo, hi = span_bounds(shade)
    assert lo == pytest.approx(float(data.train.x.min()), abs=1e-12)
    assert hi == pytest.approx(float(data.train.x.max()), abs=1e-12)

    # The plot spans the outer points, which lie beyond the shaded range on both sides.
    outer = data.val["outer"].x
    xlim = ax.get_xlim()
    assert xlim[0] < float(outer.min()) < lo and hi < float(outer.max()) < xlim[1]
    assert scattered(ax) == 300

    # The curve is the predict function over the whole plotted range.
    (curve,) = ax.lines
    xs, ys = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
    assert xs.min() == pytest.approx(xlim[0]) and xs.max() == pytest.approx(xlim[1])
    np.testing.assert_allclose(ys, np.sin(xs), atol=1e-12)

    labels = {t.get_text() for t in figs["figures/extrapolation"].legends[0].get_texts()}
    assert {"training range", "train", "val", "val outer", "prediction"} <= labels


def test_poly1d_without_an_outer_split_gets_prediction_against_data_unshaded() -> None:
    # Chosen behaviour: the same tag, but with no outer split nothing is shaded (the training range is then
    # nearly the whole plot) and the title does not claim extrapolation.
    data = build_dataset(C.Poly1dConfig(num_points=200, degree=3), seed=0)
    figs = model_figures(regression_predict, data)
    assert set(figs) == {"figures/extrapolation"}
    ax = only_axes(figs["figures/extrapolation"])
    assert len(ax.patches) == 0
    assert "Extrapolation" not in ax.get_title()
    assert scattered(ax) == 200
    x = all_x(data)
    xlim = ax.get_xlim()
    assert xlim[0] < float(x.min()) and float(x.max()) < xlim[1]
    assert xlim[1] - xlim[0] < 1.2 * float(x.max() - x.min())  # the data range, only slightly padded


def test_a_wildly_extrapolating_model_does_not_rescale_the_y_axis() -> None:
    data = build_dataset(C.SineConfig(num_points=200), seed=0)
    ax = only_axes(model_figures(lambda x: x**9, data)["figures/extrapolation"])
    ylo, yhi = ax.get_ylim()
    assert ylo > -3 and yhi < 3  # the data's range (the sine), not the model's ~ 6^9


def test_moons_decision_regions_and_boundary_follow_the_predict_function() -> None:
    data = build_dataset(C.MoonsConfig(num_points=200), seed=0)
    figs = model_figures(sign_of_x0, data)
    assert set(figs) == {"figures/decision_boundary"}
    ax = only_axes(figs["figures/decision_boundary"])

    # The regions: every cell left of x0 = 0 is class 0, every cell right of it class 1.
    (image,) = ax.images
    classes = np.asarray(image.get_array())  # rows: x1, columns: x0
    left, right, _, _ = image.get_extent()
    centres = np.linspace(left, right, classes.shape[1] + 1)
    centres = (centres[:-1] + centres[1:]) / 2
    expected = np.broadcast_to((centres > 0).astype(int), classes.shape)
    np.testing.assert_array_equal(classes, expected)
    assert 0 < expected.sum() < expected.size  # x0 = 0 is inside the moons' range: both regions show

    # The boundary line lies on x0 = 0 and crosses the whole plot.
    (contour,) = [c for c in ax.collections if isinstance(c, ContourSet)]  # two classes: one line
    verts = np.concatenate([p.vertices for p in contour.get_paths() if len(p.vertices)])
    np.testing.assert_allclose(verts[:, 0], 0.0, atol=1e-9)
    ylo, yhi = ax.get_ylim()
    assert verts[:, 1].min() == pytest.approx(ylo) and verts[:, 1].max() == pytest.approx(yhi)
    assert scattered(ax) == 200


def three_bands(t: torch.Tensor) -> torch.Tensor:
    """Class 0 left of x0 = -0.5, class 2 right of 0.5, class 1 between."""
    return torch.stack([-t[:, 0] - 0.5, 0 * t[:, 0], t[:, 0] - 0.5], dim=1)


def zero_to_two(t: torch.Tensor) -> torch.Tensor:
    """Class 0 left of x0 = 0, class 2 right of it; class 1 never wins."""
    return torch.stack([-t[:, 0], -(t[:, 0] ** 2) - 1, t[:, 0]], dim=1)


@pytest.mark.parametrize(
    ("predict", "expected_of", "edges_at"),
    [
        (three_bands, lambda c: (c > -0.5).astype(int) + (c > 0.5), [-0.5, 0.5]),
        # Contouring the class index would invent a band of class 1 where 0 meets 2.
        (zero_to_two, lambda c: 2 * (c > 0), [0.0]),
    ],
)
def test_three_classes_get_their_regions_and_boundaries_without_a_false_band(predict, expected_of, edges_at) -> None:
    x = torch.linspace(-1, 1, 50, dtype=torch.float64)
    data = DataSet(Split(torch.stack([x, x.flip(0)], dim=1), (x > 0).long()), {}, task="classification", num_classes=3)
    ax = only_axes(model_figures(predict, data)["figures/decision_boundary"])
    (image,) = ax.images
    classes = np.asarray(image.get_array())
    left, right, _, _ = image.get_extent()
    edges = np.linspace(left, right, classes.shape[1] + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    np.testing.assert_array_equal(classes, np.broadcast_to(expected_of(centres).astype(int), classes.shape))
    contours = [c for c in ax.collections if isinstance(c, ContourSet)]
    line_x = np.concatenate([p.vertices[:, 0] for c in contours for p in c.get_paths() if len(p.vertices)])
    distance = np.min(np.abs(line_x[:, None] - np.asarray(edges_at)[None, :]), axis=1)
    np.testing.assert_allclose(distance, 0.0, atol=1e-9)  # every boundary line on a true edge...
    for edge in edges_at:  # ... and every true edge drawn
        assert np.any(np.abs(line_x - edge) < 1e-9)


def test_more_than_two_inputs_give_no_figure(tmp_path) -> None:
    csv = tmp_path / "three.csv"
    rows = ["a,b,c,y", *(f"{i},{i % 3},{i % 5},{i * 0.5}" for i in range(20))]
    csv.write_text("\n".join(rows) + "\n")
    data = build_dataset(C.FileDataConfig(path=str(csv)), seed=0)
    assert data.num_inputs == 3
    calls = []
    assert model_figures(lambda x: calls.append(x) or x[:, :1], data) == {}
    assert calls == []  # not even a wasted model evaluation


def test_one_input_classification_gives_no_figure() -> None:
    x = torch.linspace(-1, 1, 10, dtype=torch.float64).unsqueeze(1)
    data = DataSet(Split(x, (x[:, 0] > 0).long()), {}, task="classification", num_classes=2)
    assert model_figures(lambda t: torch.cat([-t, t], dim=1), data) == {}


def test_predict_gets_the_data_dtype_on_cpu_without_grad() -> None:
    seen = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.dtype, x.device.type, torch.is_grad_enabled(), tuple(x.shape)))
        return torch.stack([-x[:, 0], x[:, 0]], dim=1)

    data = build_dataset(C.MoonsConfig(num_points=100), seed=0)
    model_figures(predict, data)
    model_figures(predict, data.to(torch.device("cpu"), torch.float32))
    assert [s[:3] for s in seen] == [(torch.float64, "cpu", False), (torch.float32, "cpu", False)]
    assert seen[0][3][1] == 2 and seen[0][3][0] >= 50 * 50  # a real grid over the plane


def test_large_data_is_subsampled_deterministically_keeping_every_split() -> None:
    data = build_dataset(C.SineConfig(num_points=6000), seed=0)

    def offsets() -> list[np.ndarray]:
        ax = only_axes(model_figures(regression_predict, data)["figures/extrapolation"])
        return [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]

    first, second = offsets(), offsets()
    assert len(first) == 3  # train, val, outer
    assert all(len(o) > 0 for o in first)
    assert sum(len(o) for o in first) <= MAX_POINTS
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "cfg", [C.Poly2dConfig(grid_size=10), C.SineConfig(num_points=200), C.MoonsConfig(num_points=200)]
)
def test_figure_to_rgb_gives_a_non_blank_image_of_the_figure_size(cfg) -> None:
    data = build_dataset(cfg, seed=0)
    predict = sign_of_x0 if data.task == "classification" else regression_predict
    ((_, fig),) = model_figures(predict, data).items()
    image = figure_to_rgb(fig)
    width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
    assert image.shape == (height, width, 3)
    assert image.dtype == np.uint8
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # axes, text, surface shading or regions, points: far more than a blank canvas
    assert (image < 128).any() and (image > 250).any()  # dark ink on a light background


def diverged(x: torch.Tensor, outputs: int) -> torch.Tensor:
    """A diverged model's output: NaN, +inf and -inf in turn, with some finite values between."""
    cycle = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], dtype=x.dtype)
    return cycle[torch.arange(len(x) * outputs) % 4].reshape(len(x), outputs)


def test_a_diverged_model_still_gives_figures_that_render() -> None:
    for cfg in (C.Poly2dConfig(grid_size=6), C.SineConfig(num_points=60), C.MoonsConfig(num_points=60)):
        data = build_dataset(cfg, seed=0)
        (fig,) = model_figures(lambda x, k=data.num_outputs: diverged(x, k), data).values()
        assert figure_to_rgb(fig).ndim == 3


def test_a_predict_of_the_wrong_shape_is_named() -> None:
    data = build_dataset(C.SineConfig(num_points=60), seed=0)
    with pytest.raises(ValueError, match="expected"):
        model_figures(lambda x: torch.cat([x, x], dim=1), data)
