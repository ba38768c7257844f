"""grain pipelines over random-access problem sources: shard by process, shuffle per epoch with a
seed, repeat, batch. Iterators save and restore their position exactly (get_state / set_state, or
`grain.checkpoint.CheckpointSave/CheckpointRestore` with orbax), so a resumed run sees the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np


def process_shard() -> tuple[int, int]:
    """(index, count) of this host among the JAX processes: each reads a disjoint shard."""
    import jax

    return jax.process_index(), jax.process_count()


def decode_record(record: dict[str, Any]) -> dict[str, Any]:
    """Plain Python values: bytes (ArrayRecord/tfds text) to str, numpy scalars to Python scalars."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def collate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch of dict records: lists for text and objects, stacked arrays for numbers."""
    batch: dict[str, Any] = {}
    for k in records[0]:
        values = [r[k] for r in records]
        if all(isinstance(v, (int, float, np.number, np.ndarray)) and not isinstance(v, bool) for v in values):
            batch[k] = np.stack([np.asarray(v) for v in values])
        else:
            batch[k] = values
    return batch


def math_dataset(
    source: Sequence[Any],
    batch_size: int,
    seed: int,
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard: tuple[int, int] | None = None,
    drop_remainder: bool = True,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> grain.MapDataset:
    """Dataset of batches from a random-access `source` (a list of records, a tfds/ArrayRecord data
    source, SyntheticSource, ...). `shard=(index, count)` keeps every count-th record starting at
    index (default: this JAX process's shard); the shard is shuffled afresh each epoch from `seed`;
    `num_epochs=None` repeats forever."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(source) == 0:
        raise ValueError("math_dataset: the source is empty")
    index, count = shard if shard is not None else process_shard()
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    ds = grain.MapDataset.source(source)
    if count > 1:
        ds = ds[index::count]
    if len(ds) < batch_size and drop_remainder:
        raise ValueError(f"shard {index}/{count} has {len(ds)} records, fewer than batch_size={batch_size}")
    ds = ds.map(decode_record)
    if transform is not None:
        ds = ds.map(transform)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)


def make_iterator(
    dataset: grain.MapDataset,
    state: dict[str, Any] | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Iterator over `dataset`, positioned at a saved `state` (from `iterator.get_state()`) if given.
    By default a few threads prefetch a few batches (grain's default reads 500 elements ahead)."""
    options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    it = iter(dataset.to_iter_dataset(options))
    if state is not None:
        it.set_state(state)
    return it
