"""grain pipelines: batching, per-epoch shuffles, disjoint process shards, exact resume."""

import json

import numpy as np
import pytest

from jaxrl_peft.data.pipeline import collate, make_iterator, math_dataset
from jaxrl_peft.data.synthetic import SyntheticSource

RECORDS = [{"problem": f"p{k}", "answer": str(k), "source": "t"} for k in range(23)]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_and_epochs():
    ds = math_dataset(RECORDS, batch_size=4, seed=0, num_epochs=2, shard=(0, 1))
    batches = list(make_iterator(ds))
    assert len(batches) == (2 * 23) // 4
    assert all(len(b["answer"]) == 4 and isinstance(b["problem"], list) for b in batches)
    seen = [a for b in batches for a in b["answer"]]
    first, second = seen[:23], seen[23:]
    assert sorted(first) == sorted(r["answer"] for r in RECORDS)
    assert first != second[: len(first)]


def test_same_seed_same_order_other_seed_differs():
    a = take(make_iterator(math_dataset(RECORDS, 5, seed=1, shard=(0, 1))), 6)
    b = take(make_iterator(math_dataset(RECORDS, 5, seed=1, shard=(0, 1))), 6)
    c = take(make_iterator(math_dataset(RECORDS, 5, seed=2, shard=(0, 1))), 6)
    assert a == b and a != c


@pytest.mark.parametrize("source", ["list", "synthetic"])
def test_resume_from_saved_state_matches_uninterrupted(source):
    src = RECORDS if source == "list" else SyntheticSource(50, seed=3)
    ds = math_dataset(src, batch_size=3, seed=11, shard=(0, 1))
    reference = take(make_iterator(ds), 40)
    it = make_iterator(ds)
    take(it, 17)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make_iterator(math_dataset(src, batch_size=3, seed=11, shard=(0, 1)), state)
    assert take(resumed, 23) == reference[17:]


def test_resume_with_grain_orbax_checkpoint(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    ds = math_dataset(RECORDS, batch_size=2, seed=5, shard=(0, 1))
    reference = take(make_iterator(ds), 12)
    it = make_iterator(ds)
    take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mgr:
        mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    fresh = make_iterator(math_dataset(RECORDS, batch_size=2, seed=5, shard=(0, 1)))
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mgr:
        mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert take(fresh, 7) == reference[5:]


def test_process_shards_are_disjoint_and_cover():
    shards = []
    for index in range(3):
        ds = math_dataset(RECORDS, batch_size=1, seed=0, num_epochs=1, shard=(index, 3), drop_remainder=False)
        shards.append({a for b in make_iterator(ds) for a in b["answer"]})
    assert all(not (shards[i] & shards[j]) for i in range(3) for j in range(i + 1, 3))
    assert set().union(*shards) == {r["answer"] for r in RECORDS}


def test_default_shard_is_this_process():
    ds = math_dataset(RECORDS, batch_size=23, seed=0, num_epochs=1, shuffle=False)
    assert next(make_iterator(ds))["answer"] == [r["answer"] for r in RECORDS]


def test_collate_and_errors():
    batch = collate([{"x": 1, "s": "a", "v": np.ones(2)}, {"x": 2, "s": "b", "v": np.zeros(2)}])
    assert batch["x"].tolist() == [1, 2] and batch["s"] == ["a", "b"] and batch["v"].shape == (2, 2)
    with pytest.raises(ValueError, match="shard index 3 is not in"):
        math_dataset(RECORDS, 2, seed=0, shard=(3, 3))
    with pytest.raises(ValueError, match="fewer than batch_size=16"):
        math_dataset(RECORDS, 16, seed=0, shard=(0, 2))
