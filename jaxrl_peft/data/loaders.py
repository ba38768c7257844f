"""Loaders for math datasets (jsonl / json / parquet) into records {problem, answer, source}.

Known layouts are detected from their columns: generic `problem`/`answer`, DAPO-Math-17k
(`prompt`/`solution`, supplied by the user), the MATH parquet and the study's benchmark JSON
(`prompt` chat + `reward_model.ground_truth`). Any other layout works with explicit field paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jaxrl_peft.data.prompts import strip_instruction

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
BENCHMARKS = {
    "aime24": "math_aime.json",
    "aime25": "math_aime25.json",
    "amc": "math_amc.json",
    "math500": "math_math.json",
    "minerva": "math_minerva.json",
    "olympiad": "math_olympiad_bench.json",
}
# (problem field, answer field) of the layouts we recognise, tried in order.
LAYOUTS: tuple[tuple[str, str], ...] = (
    ("problem", "answer"),
    ("prompt", "solution"),
    ("prompt", "reward_model.ground_truth"),
    ("question", "answer"),
)
_BENCHMARK_ROW = ("data_source", "prompt", "reward_model", "difficulty")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Raw rows of a .jsonl, .json or .parquet file as dicts (benchmark list-rows become dicts)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unsupported dataset format {suffix!r}; expected .jsonl, .json or .parquet")
    out = []
    for n, row in enumerate(rows):
        if isinstance(row, list) and len(row) == len(_BENCHMARK_ROW):
            row = dict(zip(_BENCHMARK_ROW, row))
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {n} is a {type(row).__name__}, expected an object")
        out.append(row)
    return out


def get_field(row: dict[str, Any], field: str) -> Any:
    """Value at a dotted path (`reward_model.ground_truth`); KeyError if absent."""
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(field)
        value = value[part]
    return value


def _text(value: Any) -> str:
    """Problem text from a string or a chat message list (last user message)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content", "") for m in value if m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    raise TypeError(f"expected a string or a chat message list, got {type(value).__name__}")


def detect_layout(row: dict[str, Any]) -> tuple[str, str] | None:
    """The first known (problem, answer) field pair that `row` has."""
    for problem_field, answer_field in LAYOUTS:
        try:
            get_field(row, problem_field)
            get_field(row, answer_field)
        except KeyError:
            continue
        return problem_field, answer_field
    return None


def load_math_dataset(
    path: str | os.PathLike,
    problem_field: str | None = None,
    answer_field: str | None = None,
    source: str | None = None,
    strip_instructions: bool = True,
    limit: int | None = None,
) -> list[dict[str, str]]:
    """Records {problem, answer, source} from a math dataset file. Fields are dotted paths; when not
    given they are detected from LAYOUTS. Known instruction wrappers are removed from problems so
    that a prompt template can be applied (strip_instructions=False keeps the text as stored)."""
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{path}: no rows")
    if problem_field is None or answer_field is None:
        layout = detect_layout(rows[0])
        if layout is None:
            raise ValueError(
                f"{path}: cannot tell the problem/answer fields from columns {sorted(rows[0])}; "
                f"pass problem_field= and answer_field= (known layouts: {list(LAYOUTS)})"
            )
        problem_field = problem_field or layout[0]
        answer_field = answer_field or layout[1]
    records = []
    for n, row in enumerate(rows):
        for field in (problem_field, answer_field):
            try:
                get_field(row, field)
            except KeyError:
                raise ValueError(f"{path}: row {n} has no field {field!r} (columns: {sorted(row)})") from None
        try:
            problem = _text(get_field(row, problem_field))
        except TypeError as e:
            raise ValueError(f"{path}: row {n} field {problem_field!r}: {e}") from None
        answer = get_field(row, answer_field)
        if isinstance(answer, (list, dict)) or answer is None:
            raise ValueError(f"{path}: row {n} field {answer_field!r} is {answer!r}, expected a string or number")
        row_source = source or str(row.get("data_source") or row.get("source") or Path(path).stem)
        records.append({
            "problem": strip_instruction(problem) if strip_instructions else problem,
            "answer": str(answer).strip(),
            "source": row_source,
        })
    return records


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """One of the study's evaluation benchmarks (BENCHMARKS) from `data_dir` (default: repo data/benchmarks)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    directory = Path(data_dir) if data_dir is not None else DATA_DIR / "benchmarks"
    return load_math_dataset(directory / BENCHMARKS[name], source=name)


def exclude_problems(records: Sequence[dict[str, str]], exclude: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """`records` without the problems that also appear in `exclude` (e.g. MATH test minus MATH-500)."""
    drop = {" ".join(r["problem"].split()) for r in exclude}
    return [r for r in records if " ".join(r["problem"].split()) not in drop]
