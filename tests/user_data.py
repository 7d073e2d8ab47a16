"""A user's own data sets, outside the package, as ``data._target_`` names them in tests/test_user_data.py."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset


def _table(rows: int, features: int, seed: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=gen, dtype=torch.float64)
    score = x @ torch.linspace(1.0, -1.0, features, dtype=torch.float64)
    if classes:
        return x, torch.bucketize(score, torch.tensor([-0.5, 0.5], dtype=torch.float64)[: classes - 1])
    return x, score + 0.1 * torch.randn(rows, generator=gen, dtype=torch.float64)


def tensors(rows: int = 200, features: int = 3, seed: int = 0, classes: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, y): the in-memory fast path; integer y (``classes`` > 1) is classification."""
    return _table(rows, features, seed, classes)


def tensors_with_val(rows: int = 200, features: int = 3) -> tuple[torch.Tensor, ...]:
    """(x, y, x_val, y_val): the user's own validation rows."""
    x, y = _table(rows, features, 0, 0)
    return x[:160], y[:160], x[160:], y[160:]


class TableDataset(Dataset):
    """Rows of a table, one (input, target) item at a time, as most users write a Dataset."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def dataset(rows: int = 200, features: int = 3, classes: int = 0) -> Dataset:
    """One Dataset: dtrain holds out data.val_fraction of it."""
    return TableDataset(*_table(rows, features, 0, classes))


def datasets(rows: int = 200, features: int = 3, classes: int = 0) -> tuple[Dataset, Dataset]:
    """(train, val) Datasets, split as tensors_with_val splits."""
    x, y = _table(rows, features, 0, classes)
    return TableDataset(x[:160], y[:160]), TableDataset(x[160:], y[160:])


class Images(Dataset):
    """Inputs of shape [1, 6, 6] with two classes and a `classes` attribute, as torchvision's data sets have."""

    def __init__(self, rows: int = 96) -> None:
        self.classes = ["dark", "light"]
        gen = torch.Generator().manual_seed(1)
        self.y = torch.randint(0, 2, (rows,), generator=gen)
        self.x = torch.randn(rows, 1, 6, 6, generator=gen) + (2 * self.y - 1)[:, None, None, None].float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def images() -> Dataset:
    return Images()


def not_data() -> str:
    return "rows"


def flat_linear(num_inputs: int, num_outputs: int) -> torch.nn.Module:
    """A model for inputs of any shape: flattened, then one linear layer (num_inputs counts a row's values)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(num_inputs, num_outputs))


def mismatched() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(10, 3), torch.zeros(9)


def labels_from_one() -> tuple[torch.Tensor, torch.Tensor]:
    """Classes numbered 1..3, as a spreadsheet numbers them."""
    x, y = _table(60, 3, 0, 3)
    return x, y + 1


class Unpaired(Dataset):
    """Items without a target."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(3)


def unpaired() -> Dataset:
    return Unpaired()


def tensor_datasets(rows: int = 200, features: int = 3) -> tuple[TensorDataset, TensorDataset]:
    """torch's own TensorDataset, which dtrain reads a batch at a time (one gather per tensor)."""
    x, y = _table(rows, features, 0, 0)
    return TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:])


def frame() -> tuple[object, object]:
    """A pandas DataFrame of features and a Series of targets, as a user with a table has them."""
    import pandas as pd

    x, y = _table(200, 3, 0, 0)
    table = pd.DataFrame(x.numpy(), columns=["a", "b", "c"])
    return table, pd.Series(y.numpy(), name="y")


def text_frame() -> tuple[object, object]:
    import pandas as pd

    return pd.DataFrame({"a": [1.0, 2.0], "city": ["Oslo", "Bergen"]}), pd.Series([1.0, 2.0])


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(3), torch.zeros(1)


def stream() -> torch.utils.data.IterableDataset:
    return Stream()


def narrow_val() -> tuple[torch.Tensor, ...]:
    """Validation rows with one feature fewer than the training rows."""
    x, y = _table(100, 3, 0, 0)
    return x[:80], y[:80], x[80:, :2], y[80:]


def dummies_frame() -> tuple[object, object]:
    """A text column one-hot encoded by pandas' get_dummies: boolean columns beside a float one."""
    import pandas as pd

    x, y = _table(200, 1, 0, 0)
    city = pd.Series(["Oslo", "Bergen"] * 100, name="city")
    table = pd.get_dummies(pd.DataFrame({"a": x[:, 0].numpy(), "city": city}))
    return table, pd.Series(y.numpy(), name="y")
