"""Dataset loaders: the study's benchmarks, the MATH parquet, DAPO-style and generic files, errors."""

import json

import pytest

from jaxrl_peft.data.loaders import BENCHMARKS, DATA_DIR, exclude_problems, load_benchmark, load_math_dataset
from jaxrl_peft.data.prompts import DAPO_PREFIX, DAPO_SUFFIX

BENCHMARK_ROWS = {"aime24": 30, "aime25": 30, "amc": 83, "math500": 500, "minerva": 272, "olympiad": 675}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmarks(name):
    records = load_benchmark(name)
    assert len(records) == BENCHMARK_ROWS[name]
    assert all(r["problem"] and r["answer"] and r["source"] == name for r in records)
    assert not any(r["problem"].startswith("Your task is") for r in records)


def test_aime_first_row():
    first = load_benchmark("aime24")[0]
    assert first["answer"] == "204"
    assert first["problem"].startswith("Every morning Aya goes for a $9$-kilometer-long walk")


def test_math_parquet_strips_instruction_and_excludes_math500():
    test = load_math_dataset(DATA_DIR / "train" / "math_test.parquet")
    assert len(test) == 5000
    assert not any("within \\boxed{}" in r["problem"] for r in test)
    assert len(exclude_problems(test, load_benchmark("math500"))) == 4500
    train = load_math_dataset(DATA_DIR / "train" / "math_train.parquet", limit=5)
    assert train[0]["answer"] == "0" and train[0]["source"] == "DigitalLearningGmbH/MATH-lighteval"


def test_dapo_layout_jsonl_and_parquet(tmp_path):
    rows = [
        {"prompt": DAPO_PREFIX + "What is 1+1?" + DAPO_SUFFIX, "solution": "2", "data_source": "dapo"},
        {"prompt": "What is 2+2?", "solution": 4},
    ]
    path = tmp_path / "dapo.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_math_dataset(path)
    assert records == [
        {"problem": "What is 1+1?", "answer": "2", "source": "dapo"},
        {"problem": "What is 2+2?", "answer": "4", "source": "dapo"},
    ]
    kept = load_math_dataset(path, strip_instructions=False)
    assert kept[0]["problem"].startswith("Solve the following math problem")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "Q?", "solution": "5"}]), tmp_path / "dapo.parquet")
    assert load_math_dataset(tmp_path / "dapo.parquet")[0] == {"problem": "Q?", "answer": "5", "source": "dapo"}


def test_custom_fields_json(tmp_path):
    path = tmp_path / "custom.json"
    path.write_text(json.dumps([{"q": {"text": "Compute 3*3."}, "meta": {"final": "9"}}]))
    records = load_math_dataset(path, problem_field="q.text", answer_field="meta.final", source="mine")
    assert records == [{"problem": "Compute 3*3.", "answer": "9", "source": "mine"}]


def test_errors_name_file_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n" + json.dumps({"problem": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1 has no field 'answer'"):
        load_math_dataset(path)
    with pytest.raises(ValueError, match=r"bad.jsonl: row 0 has no field 'question'"):
        load_math_dataset(path, problem_field="question", answer_field="answer")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "x", "label": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"odd.jsonl: cannot tell the problem/answer fields.*'label', 'text'"):
        load_math_dataset(odd)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_math_dataset(broken)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported dataset format '.csv'"):
        load_math_dataset(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_math_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown benchmark 'aime26'"):
        load_benchmark("aime26")
