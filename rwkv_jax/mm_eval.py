"""A ModRWKV model on one multimodal benchmark: the benchmark's own files -> prompts -> greedy answers ->
`jaxrl_peft.eval.mm_scorers` scores, a results table and per-item JSON (`launch/eval.py --modrwkv`).

Prompts are built as the evaluation scripts behind the published numbers build them, then wrapped by the
model's chat format (`\\x16User: {prompt}\\x17\\x16Assistant:`, `modrwkv_task.generate_answers`):

- VQAv2, GQA, POPE, TextVQA: `{question}\\nAnswer the question using a single word or phrase.` (LLaVA
  docs/Evaluation.md, "short-answer"; the LLaVA question files the reference's eval/vqa2.py reads carry
  it). TextVQA goes without the Rosetta OCR tokens (its annotation file holds none), as lmms-eval's
  default TextVQA prompt does.
- ScienceQA: `Context: {hint}\\n` (when there is a hint), `{question}`, one `A. {choice}` line per choice,
  then `Answer with the option's letter from the given choices directly.` (LLaVA's llava_test_CQM-A.json
  + `--single-pred-prompt` in the reference's eval/model_vqa_science.py, as lmms-eval's
  tasks/scienceqa/utils.py rebuilds it). Problems without an image are asked with text only, as the
  reference's script does; the table has the accuracy over all and over those with an image.
- LibriSpeech: the audio, then `\\x16Assistant:` with no user turn (the reference's eval/asr), unless the
  model was trained with an instruction (`instruction`, default data.ASR_INSTRUCTION for the placeholder
  layout, which needs a user turn to hold the audio slots).

The image goes where the model's chat format puts it: its slots before the text in the paper-era layout
(the prompt text holds no marker, as in eval/vqa2.py), or at an `<image>` marker opening the user turn
in the later placeholder layout (`<image>\\n{prompt}`, as LLaVA's loaders and our LLaVA records write
it). Answers are greedy and stripped of surrounding white space (the reference drops the leading space
with `output[1:]`, LLaVA strips).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from jaxrl_peft.eval import mm_scorers
from jaxrl_peft.rl import rollout
from rwkv_jax import data, modrwkv, modrwkv_task, multimodal as mm

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
BENCHMARKS = mm_scorers.BENCHMARKS
AUDIO_BENCHMARKS = ("librispeech",)
DEFAULT_MAX_NEW_TOKENS = {"librispeech": 256}  # others: 128, as LLaVA's model_vqa_loader and eval/vqa2.py
SOURCE_FIELDS = ("questions", "annotations", "images", "transcripts", "audio", "split", "instruction")
# The inputs each benchmark reads (required ones first); any other one given is an error, not ignored.
REQUIRED = {"vqav2": ("questions", "annotations", "images"), "textvqa": ("questions", "images"),
            "gqa": ("questions", "images"), "pope": ("questions", "images"), "scienceqa": ("questions", "images"),
            "librispeech": ("transcripts",)}
OPTIONAL = {"scienceqa": ("split",), "librispeech": ("audio", "instruction")}
AUDIO_SUFFIXES = (".flac", ".wav")
GROUP_BATCHES = 32  # batches per generate_answers call (each call compiles its encoder functions once)

Record = dict[str, Any]


class InputError(ValueError):
    """A bad flag, file, benchmark record or model, found before generation starts."""


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where a benchmark's files are (None: not given). questions: VQAv2 questions / TextVQA / GQA questions
    JSON, POPE JSONL or ScienceQA problems.json; annotations: VQAv2 annotations; images: the image folder;
    transcripts: a LibriSpeech *.trans.txt or a folder of them; audio: the audio root (default: beside
    each transcript file); split: ScienceQA split (default test); instruction: ASR user turn."""

    questions: str | None = None
    annotations: str | None = None
    images: str | None = None
    transcripts: str | None = None
    audio: str | None = None
    split: str | None = None
    instruction: str | None = None

    def check(self, benchmark: str) -> None:
        """Raises InputError for an unknown benchmark, a missing required input, an input the benchmark
        does not read, or a path that does not exist."""
        if benchmark not in BENCHMARKS:
            raise InputError(f"--benchmark={benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
        given = {name for name in SOURCE_FIELDS if getattr(self, name) is not None}
        missing = [name for name in REQUIRED[benchmark] if name not in given]
        if missing:
            raise InputError(f"--benchmark={benchmark} needs " + " ".join(f"--{name}=..." for name in missing))
        unused = sorted(given - set(REQUIRED[benchmark]) - set(OPTIONAL.get(benchmark, ())))
        if unused:
            raise InputError(f"--benchmark={benchmark} does not read " + ", ".join(f"--{name}" for name in unused))
        for name in ("questions", "annotations", "transcripts"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise InputError(f"--{name}={path}: no such file or directory")
        for name in ("images", "audio"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_dir():
                raise InputError(f"--{name}={path}: not a directory")


@dataclasses.dataclass(frozen=True)
class Question:
    """One benchmark question ready for the model: the loader's record, the prompt text (no marker) and
    its image or audio file (None: text only)."""

    record: Record
    prompt: str
    item: str | None


# ------------------------------------------------------------------------------------------------
# Benchmark files -> questions


def short_answer_prompt(question: str) -> str:
    """LLaVA's short-answer prompt (VQAv2, GQA, POPE, TextVQA)."""
    return f"{question}\n{SHORT_ANSWER}"


def scienceqa_prompt(question: str, choices: Sequence[str], hint: str = "") -> str:
    """LLaVA's ScienceQA prompt: optional context line, question, lettered choices, the letter instruction."""
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(mm_scorers.SCIENCEQA_OPTIONS, choices))
    return f"{context}{question}\n{options}\n{LETTER_ANSWER}"


def load_records(benchmark: str, sources: Sources) -> list[Record]:
    """The benchmark's records through its `mm_scorers.load_<benchmark>` reader."""
    if benchmark == "vqav2":
        return mm_scorers.load_vqav2(sources.questions, sources.annotations)
    if benchmark == "textvqa":
        return mm_scorers.load_textvqa(sources.questions)
    if benchmark == "gqa":
        return mm_scorers.load_gqa(sources.questions)
    if benchmark == "pope":
        return mm_scorers.load_pope(sources.questions)
    if benchmark == "scienceqa":
        return mm_scorers.load_scienceqa(sources.questions, sources.split or "test")
    if benchmark == "librispeech":
        return mm_scorers.load_librispeech(sources.transcripts)
    raise InputError(f"--benchmark={benchmark!r}: expected one of {', '.join(BENCHMARKS)}")


def _numbered_images(folder: Path) -> dict[int, Path]:
    """COCO images by id, from names ending in the zero-padded id (COCO_val2014_000000262148.jpg, 000000262148.jpg)."""
    found = {}
    for name in os.listdir(folder):
        match = re.search(r"(\d+)\.(jpe?g|png)$", name, re.IGNORECASE)
        if match:
            found[int(match.group(1))] = folder / name
    return found


def _existing(path: Path, what: str) -> str:
    """`path` as a string, or InputError naming `what` needs it."""
    if not path.is_file():
        raise InputError(f"{what}: no file {path}")
    return str(path)


def _audio_file(root: Path, utterance: str) -> str:
    """<root>/<speaker>/<chapter>/<id>.flac (a LibriSpeech split) or <root>/<id>.flac (a chapter), or .wav."""
    parts = utterance.split("-")
    folders = ([root / parts[0] / parts[1]] if len(parts) == 3 else []) + [root]
    for folder in folders:
        for suffix in AUDIO_SUFFIXES:
            if (folder / f"{utterance}{suffix}").is_file():
                return str(folder / f"{utterance}{suffix}")
    raise InputError(f"librispeech utterance {utterance}: no audio file {folders[0] / utterance}"
                     f"{'|'.join(AUDIO_SUFFIXES)}")


def questions(benchmark: str, sources: Sources, limit: int = 0) -> tuple[list[Record], list[Question]]:
    """The benchmark's records (the first `limit` when > 0) and their questions; every image or audio file
    is checked to exist, so a bad path fails before the model loads."""
    sources.check(benchmark)
    try:
        records = load_records(benchmark, sources)
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from e
    if limit > 0:
        records = records[:limit]
    if not records:
        raise InputError(f"{benchmark}: the files hold no records" + (f" of split {sources.split or 'test'!r}"
                                                                        if benchmark == "scienceqa" else ""))
    images = Path(sources.images) if sources.images else None
    out = []
    if benchmark == "vqav2":
        by_id = _numbered_images(images)
        for r in records:
            if r["image_id"] not in by_id:
                raise InputError(f"vqav2 question {r['id']}: no image {r['image_id']:012d}.jpg (COCO_<subset>_"
                                 f"{r['image_id']:012d}.jpg) in {images}")
            out.append(Question(r, short_answer_prompt(r["question"]), str(by_id[r["image_id"]])))
    elif benchmark in ("textvqa", "gqa"):
        for r in records:
            item = _existing(images / f"{r['image_id']}.jpg", f"{benchmark} question {r['id']}")
            out.append(Question(r, short_answer_prompt(r["question"]), item))
    elif benchmark == "pope":
        for r in records:
            out.append(Question(r, short_answer_prompt(r["question"]),
                                _existing(images / r["image"], f"pope question {r['id']}")))
    elif benchmark == "scienceqa":
        problems = json.loads(Path(sources.questions).read_text(encoding="utf-8"))  # the loader keeps no hint
        for r in records:
            hint = problems[r["id"]].get("hint") or ""
            item = None if r["image"] is None else _existing(images / r["id"] / r["image"],
                                                              f"scienceqa problem {r['id']}")
            out.append(Question(r, scienceqa_prompt(r["question"], r["choices"], hint), item))
    else:
        root = Path(sources.audio) if sources.audio else None
        transcripts = Path(sources.transcripts)
        for r in records:
            folder = root or (transcripts if transcripts.is_dir() else transcripts.parent)
            out.append(Question(r, "", _audio_file(folder, r["id"])))
    return records, out


def reference_fields(benchmark: str, record: Record) -> dict[str, Any]:
    """The ground truth of a record as the per-item JSON shows it ('answer' or 'answers')."""
    if benchmark in ("vqav2", "textvqa"):
        return {"answers": record["answers"]}
    if benchmark == "gqa":
        return {"answer": record["answer"]}
    if benchmark == "pope":
        return {"answer": record["label"]}
    if benchmark == "scienceqa":
        return {"answer": mm_scorers.SCIENCEQA_OPTIONS[record["answer"]], "choices": record["choices"]}
    return {"answer": record["text"]}


# ------------------------------------------------------------------------------------------------
# Questions -> the model's answers


def conversation(question: Question, family: modrwkv.ModRWKVFamily, instruction: str | None = None
                 ) -> data.MultimodalRecord:
    """The record `modrwkv_task.generate_answers` takes: the prompt as the first user turn, with the image
    marker where the chat format needs one; ASR: the reference's prompt-free turn or `instruction`."""
    placeholder = family.config.format.layout == "placeholder"
    if family.config.modality == "audio":
        if instruction is None and placeholder:
            instruction = data.ASR_INSTRUCTION
        if not instruction and placeholder:
            raise InputError("this model puts the audio at a marker in the user turn: give --instruction=TEXT")
        turns = data.asr_conversation("", instruction or None)
        return data.MultimodalRecord(turns, [], [data.load_audio(question.item)], question.record["id"])
    text = f"{data.IMAGE_MARKER}\n{question.prompt}" if placeholder and question.item else question.prompt
    return data.MultimodalRecord([{"from": "human", "value": text}], [question.item] if question.item else [],
                                 [], str(question.record["id"]))


def text_answers(family: modrwkv.ModRWKVFamily, variables: dict, prompts: Sequence[str],
                 sampler: rollout.Sampler, tokenizer: Any, batch_size: int) -> list[str]:
    """Greedy answers to text-only prompts (`\\x16User: {p}\\x17\\x16Assistant:`), decoded in RNN mode."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [mm.generation_prompt(p, (), family.config.format, tokenizer).input_ids for p in chunk]
        tokens, valid = rollout.left_pad(ids, 0)
        out = jax.device_get(sampler(variables, tokens, valid, jax.random.key(0)))
        answers += rollout.decode_completions(tokenizer, out, len(chunk))
    return answers


def answer(family: modrwkv.ModRWKVFamily, variables: dict, items: Sequence[Question], sampler: rollout.Sampler,
           tokenizer: Any, batch_size: int, instruction: str | None = None,
           log: Callable[[str], None] | None = None) -> list[str]:
    """The model's stripped greedy answer to each question, in order. Questions are batched by prompt length
    (less padding, fewer compiled shapes); those with an item go through `generate_answers`."""
    order = sorted(range(len(items)), key=lambda i: (items[i].item is None,
                                                     len(tokenizer.encode(items[i].prompt))))
    answers: list[str | None] = [None] * len(items)
    group = batch_size * GROUP_BATCHES
    start_time = time.perf_counter()
    for start in range(0, len(order), group):
        chunk = order[start:start + group]
        with_item = [i for i in chunk if items[i].item is not None]
        text_only = [i for i in chunk if items[i].item is None]
        if with_item:
            records = [conversation(items[i], family, instruction) for i in with_item]
            out = modrwkv_task.generate_answers(family, variables, records, sampler, tokenizer, batch_size)
            for i, text in zip(with_item, out):
                answers[i] = text.strip()
        if text_only:
            out = text_answers(family, variables, [items[i].prompt for i in text_only], sampler, tokenizer,
                               batch_size)
            for i, text in zip(text_only, out):
                answers[i] = text.strip()
        if log is not None:
            log(f"{start + len(chunk)}/{len(items)} answered ({time.perf_counter() - start_time:.0f} s)")
    return [a if a is not None else "" for a in answers]


# ------------------------------------------------------------------------------------------------
# The whole run


@dataclasses.dataclass
class Results:
    """One benchmark's table row (mm_scorers.score), its per-item results and the generation time."""

    benchmark: str
    row: dict[str, Any]
    items: list[dict[str, Any]]
    seconds: float

    def table(self) -> str:
        """The markdown table of the benchmark's metrics (percentages; counts as counts)."""
        return mm_scorers.format_table([self.row])

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "summary": self.row, "seconds": self.seconds, "items": self.items}


def score(benchmark: str, records: Sequence[Record], items: Sequence[Question], predictions: Sequence[str],
          seconds: float = 0.0) -> Results:
    """mm_scorers.score of the predictions, each item joined with its prompt and ground truth."""
    row, scored = mm_scorers.score(benchmark, {r["id"]: p for r, p in zip(records, predictions)}, records)
    per_item = [{"id": q.record["id"], "question": q.prompt, "prediction": p, **reference_fields(benchmark, q.record),
                 **{k: v for k, v in s.items() if k not in ("id", "prediction")}}
                for q, p, s in zip(items, predictions, scored)]
    return Results(benchmark, row, per_item, seconds)


def load_model(path: str, encoder: str | None = None, dtype: str = "float32"
               ) -> tuple[modrwkv.ModRWKVFamily, dict]:
    """A ModRWKV directory (`modrwkv.load`) or, with `encoder`, a reference checkpoint file."""
    try:
        if encoder:
            return modrwkv.from_reference(path, encoder, dtype=jnp.dtype(dtype))
        return modrwkv.load(path, dtype=jnp.dtype(dtype))
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"--modrwkv={path}: {e}") from e


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(model: str, benchmark: str, sources: Sources, output: str | None = None, *, encoder: str | None = None,
        limit: int = 0, batch_size: int = 16, max_new_tokens: int | None = None, dtype: str = "float32",
        log: Callable[[str], None] | None = _stderr) -> Results:
    """Evaluates the ModRWKV model at `model` on `benchmark`: checks the inputs, answers every question
    greedily, scores, and writes {benchmark, summary, items, ...} as JSON to `output` (when given)."""
    if batch_size < 1:
        raise InputError(f"--batch_size={batch_size}: must be at least 1")
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(benchmark, 128)
    if max_new_tokens < 1:
        raise InputError(f"--max_new_tokens={max_new_tokens}: must be at least 1")
    try:
        jnp.dtype(dtype)
    except TypeError as e:
        raise InputError(f"--dtype={dtype!r}: not a dtype (float32, bfloat16, ...)") from e
    if not Path(model).exists():
        raise InputError(f"--modrwkv={model}: no such file or directory")
    records, items = questions(benchmark, sources, limit)
    if output:
        out = epath.Path(output)
        if out.is_dir():
            raise InputError(f"--output={output} is a directory; expected a .json file path")
        out.parent.mkdir(parents=True, exist_ok=True)
    family, params = load_model(model, encoder, dtype)
    wanted = "audio" if benchmark in AUDIO_BENCHMARKS else "vision"
    if family.config.modality != wanted:
        raise InputError(f"--modrwkv={model} takes {family.config.modality} input; {benchmark} needs "
                         f"{'an audio' if wanted == 'audio' else 'a vision'} model")
    tokenizer = family.tokenizer()
    c = ml_collections.ConfigDict({"eval": {"max_new_tokens": max_new_tokens}})
    sampler = modrwkv_task.eval_sampler(family, tokenizer, c)
    if log is not None:
        log(f"{benchmark}: {len(items)} questions, batch {batch_size}, up to {max_new_tokens} new tokens")
    start = time.perf_counter()
    predictions = answer(family, {"params": params}, items, sampler, tokenizer, batch_size, sources.instruction, log)
    results = score(benchmark, records, items, predictions, time.perf_counter() - start)
    if output:
        payload = {"model": model, "encoder": encoder, "sources": dataclasses.asdict(sources), "limit": limit,
                   "batch_size": batch_size, "max_new_tokens": max_new_tokens, "dtype": dtype,
                   "chat_format": family.config.format.layout, **results.to_json()}
        epath.Path(output).write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    return results
