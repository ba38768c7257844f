"""DAPO dynamic sampling that refills the step: half the groups carry no signal, every step still
trains its full number of groups, the extra rounds are counted, and a resumed run is identical."""

import json
import zlib

import jax
import numpy as np
import pytest

from configs.grpo_lora import get_config
from jaxrl_peft.infra import checkpoint, mesh as mesh_lib
from jaxrl_peft.rl import grpo
from jaxrl_peft.train import loop

ONE = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])
# Half the problems are graded 0 whatever the completion (a group with no spread); the others by a
# hash of the completion, so their groups almost always have spread.
RECORDS = [{"problem": f"What is {i} + {i}?", "answer": "FLAT" if i % 2 else str(2 * i)} for i in range(400)]


def scorer(completions, golds):
    return [0.0 if g == "FLAT" else float(zlib.crc32(c.encode()) % 2) for c, g in zip(completions, golds)]


def _config(steps=4):
    c = get_config("tiny")
    c.steps, c.checkpoint_every, c.eval_every, c.log_every = steps, 2, 0, 100
    c.rl.update(dynamic_sampling=True, prompts_per_step=4, group_size=4, max_new_tokens=12, micro_batch_size=16,
                max_sampling_rounds=4)
    c.eval.update(num_problems=2, samples=1, batch_size=8)
    c.data.shuffle = False  # FLAT and graded problems alternate: every round holds half of each
    return c


class _Crash(RuntimeError):
    pass


class _CrashingTask(grpo.GRPOTask):
    def next_batch(self, step, frozen, adapter):
        if step == 3:
            raise _Crash("killed")
        return super().next_batch(step, frozen, adapter)


def _metrics(workdir):
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time_") and k != "tokens_per_s"}
            for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_refill_gives_full_steps_and_resumes_exactly(tmp_path):
    c = _config()
    loop.train(grpo.GRPOTask(c, records=RECORDS, scorer=scorer), c, tmp_path / "full", mesh=ONE)
    rows = _metrics(tmp_path / "full")
    assert len(rows) == 4
    for r in rows:
        assert r["groups_trained"] == 4 and r["full_batch"] == 1, r
        assert r["sampling_rounds"] >= 1, r  # one round holds only 2 informative groups: it had to refill
        assert r["groups_sampled"] == 4 * (r["sampling_rounds"] + 1)
        assert r["groups_informative"] >= 4
    with pytest.raises(_Crash):
        loop.train(_CrashingTask(c, records=RECORDS, scorer=scorer), c, tmp_path / "part", mesh=ONE)
    loop.train(grpo.GRPOTask(c, records=RECORDS, scorer=scorer), c, tmp_path / "part", mesh=ONE)
    assert _metrics(tmp_path / "part") == rows
    a, b = (checkpoint.read_state(tmp_path / d, 4)["adapter"] for d in ("full", "part"))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_at_the_cap_the_step_trains_on_what_it_has(tmp_path, capsys):
    c = _config(steps=1)
    c.rl.max_sampling_rounds = 0
    loop.train(grpo.GRPOTask(c, records=RECORDS, scorer=scorer), c, tmp_path, mesh=ONE)
    (row,) = _metrics(tmp_path)
    assert row["sampling_rounds"] == 0 and row["groups_trained"] < 4 and row["full_batch"] == 0
    assert "dynamic sampling reached its cap of 0 extra rounds" in capsys.readouterr().out
