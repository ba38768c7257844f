"""tfds builder: writes ArrayRecord without TensorFlow; the pipeline reads it back and resumes."""

from jaxrl_peft.data.loaders import DATA_DIR
from jaxrl_peft.data.pipeline import make_iterator, math_dataset
from jaxrl_peft.data.synthetic import generate
from jaxrl_peft.data.tfds_builder import array_record_source, build_math_problems


def test_build_and_read_back(tmp_path):
    synthetic = [p.as_record() for p in generate(40, seed=1)]
    out = build_math_problems(
        "mixed", {"train": synthetic, "aime": DATA_DIR / "benchmarks" / "math_aime.json"}, tmp_path
    )
    assert any(p.name.startswith("math_problems-train.array_record") for p in out.iterdir())
    train = array_record_source("mixed", "train", tmp_path)
    assert len(train) == 40 and train[7] == synthetic[7]
    aime = array_record_source("mixed", "aime", tmp_path)
    assert len(aime) == 30 and aime[0]["answer"] == "204" and isinstance(aime[0]["problem"], str)

    ds = math_dataset(train, batch_size=4, seed=0, shard=(0, 1))
    reference = [next(it) for it in [make_iterator(ds)] for _ in range(15)]
    it = make_iterator(ds)
    [next(it) for _ in range(6)]
    resumed = make_iterator(math_dataset(train, batch_size=4, seed=0, shard=(0, 1)), it.get_state())
    assert [next(resumed) for _ in range(9)] == reference[6:]


def test_missing_dataset_is_named(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="no prepared dataset 'nope'"):
        array_record_source("nope", "train", tmp_path)
