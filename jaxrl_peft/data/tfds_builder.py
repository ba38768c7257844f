"""tensorflow-datasets builder that writes math problem records to ArrayRecord (no TensorFlow needed),
and the random-access source that grain pipelines read back.

`build_math_problems('math_train', {'train': 'data/train/math_train.parquet'}, data_dir)` writes
`data_dir/math_problems/math_train/1.0.0/*.array_record-*`; `array_record_source(...)` opens a split.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from jaxrl_peft.data.loaders import load_math_dataset
from jaxrl_peft.data.pipeline import decode_record

SplitInput = str | os.PathLike | Sequence[Mapping[str, str]]


class MathProblems(tfds.core.GeneratorBasedBuilder):
    """Math problems {problem, answer, source}; one builder config per dataset (its name is the
    config name), splits given as files (any format `load_math_dataset` reads) or record lists."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "problem, answer, source as text."}

    def __init__(
        self,
        *,
        splits: Mapping[str, SplitInput] | None = None,
        problem_field: str | None = None,
        answer_field: str | None = None,
        **kwargs: Any,
    ):
        self._splits = dict(splits or {})
        self._fields = (problem_field, answer_field)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Math problems with verifiable answers (jaxrl_peft).",
            disable_shuffling=True,  # record k of a split is input row k
            features=tfds.features.FeaturesDict({
                "problem": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "source": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        if not self._splits:
            raise ValueError(f"MathProblems({self.builder_config.name}): no splits given to write")
        return {name: self._generate_examples(split) for name, split in self._splits.items()}

    def _generate_examples(self, split: SplitInput):
        if isinstance(split, (str, os.PathLike)):
            records = load_math_dataset(split, problem_field=self._fields[0], answer_field=self._fields[1])
        else:
            records = list(split)
        for k, r in enumerate(records):
            yield k, {"problem": r["problem"], "answer": r["answer"], "source": r.get("source", "")}


def build_math_problems(
    name: str,
    splits: Mapping[str, SplitInput],
    data_dir: str | os.PathLike,
    problem_field: str | None = None,
    answer_field: str | None = None,
) -> Path:
    """Write the splits of dataset `name` to ArrayRecord under `data_dir` (skipped if already written);
    returns the dataset directory."""
    builder = MathProblems(
        config=tfds.core.BuilderConfig(name=name),
        data_dir=os.fspath(data_dir),
        file_format="array_record",
        splits=splits,
        problem_field=problem_field,
        answer_field=answer_field,
    )
    builder.download_and_prepare()
    return Path(builder.data_dir)


class _DecodedSource:
    """Random-access view of a tfds ArrayRecord split yielding records with str fields."""

    def __init__(self, source: Any):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [decode_record(r) for r in self._source.__getitems__(indices)]


def array_record_source(name: str, split: str, data_dir: str | os.PathLike) -> _DecodedSource:
    """The `split` of dataset `name` written by `build_math_problems`, for `pipeline.math_dataset`."""
    root = Path(data_dir) / "math_problems" / name
    versions = sorted(p for p in root.glob("*.*.*") if (p / "dataset_info.json").exists())
    if not versions:
        raise FileNotFoundError(f"no prepared dataset {name!r} under {root}; run build_math_problems first")
    builder = tfds.builder_from_directory(os.fspath(versions[-1]))
    if split not in builder.info.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    return _DecodedSource(builder.as_data_source(split=split))
