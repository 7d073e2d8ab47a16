"""Data sets (generated from the seed or read from a file) and the sharded in-memory loader."""

from dtrain.data.dataset import DataSet, Split, build_dataset
from dtrain.data.loader import ShardedBatches, shard_bounds

__all__ = ["DataSet", "ShardedBatches", "Split", "build_dataset", "shard_bounds"]
