"""Data sets (generated from the seed or read from a file) and the sharded in-memory loader."""

from dtrain.data.dataset import DataSet, Split
from dtrain.data.loader import ShardedBatches, shard_bounds
from dtrain.data.registry import build_dataset

__all__ = ["DataSet", "ShardedBatches", "Split", "build_dataset", "shard_bounds"]
