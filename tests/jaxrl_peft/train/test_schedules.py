"""The optimizer's learning-rate schedules against hand-computed values."""

import numpy as np
import pytest

from jaxrl_peft.train import optimizer


def _values(steps, **fields):
    schedule = optimizer.schedule(optimizer.config(learning_rate=1.0, **fields), 110)
    return [float(schedule(i)) for i in steps]


def test_warmup_then_cosine_to_the_end_value():
    got = _values([0, 5, 10, 60, 110], schedule="cosine", warmup_steps=10, end_learning_rate=0.1)
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6)


def test_warmup_stable_decay():
    """10 warmup steps, constant until 80% of the remaining 100, then linear to the end value."""
    got = _values([0, 5, 10, 50, 90, 95, 100, 110], schedule="wsd", warmup_steps=10, decay_fraction=0.2)
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 1.0, 1.0, 0.75, 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("fields", [dict(schedule="linear"), dict(schedule="wsd", decay_fraction=0.0)])
def test_bad_schedule_fields_are_named(fields):
    with pytest.raises(ValueError, match="optim"):
        optimizer.schedule(optimizer.config(**fields), 10)
