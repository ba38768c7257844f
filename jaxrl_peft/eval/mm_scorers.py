"""Scorers for the multimodal and speech benchmarks: VQAv2, GQA, POPE, ScienceQA, TextVQA, LibriSpeech.

Each benchmark has a loader that reads its own annotation format into plain records, and a scorer that
turns predictions (a mapping from the record id to the model's text) into per-item scores and one
table row. Answer parsing and normalisation follow the code that produced the published numbers:

- VQAv2: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py at commit
  a013f0043c1e2cdc995922dfe257f7149aa9af06 (BSD licence, (c) 2014 Aishwarya Agrawal); the tables
  below are transcribed from it. As in LLaVA (scripts/convert_vqav2_for_submission.py), the model's
  text first goes through the EvalAI answer processor, then the official per-question accuracy runs.
- TextVQA: the m4c TextVQAAccuracyEvaluator (facebookresearch/mmf, copied into haotian-liu/LLaVA
  llava/eval/m4c_evaluator.py at commit c121f0432da27facab705978f83c4ada465e46fd): EvalAI
  processing on both sides, then the same 10-choose-9 soft accuracy.
- GQA: the official eval.py scores `prediction == answer` over balanced questions; LLaVA
  (scripts/convert_gqa_for_eval.py) first applies `text.rstrip('.').lower()`.
- POPE: RUCAIBox/POPE evaluate.py at commit 3df3ba1b110ecce25696989577fad583b67d4239 (same as
  LLaVA's eval_pope.py): first sentence, commas dropped, "no" if the words hold "No", "no" or "not".
- ScienceQA: LLaVA llava/eval/eval_science_qa.py: the text is a letter, or starts with "X. ", or holds
  exactly one "The answer is X." match.
- WER / CER: Levenshtein distance summed over the corpus divided by the total reference length, over
  whitespace-separated words (WER) or characters (CER).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]
TableRow = dict[str, Any]

# ------------------------------------------------------------------------------------------------
# VQA answer normalisation (vqaEval.py, transcribed)
# ------------------------------------------------------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
               "`", ",", "?", "!")
# The official "(?!<=\d)" is a lookahead (a typo for a lookbehind) that never blocks a period, so this
# strips every period not followed by a digit: "u.s." -> "us", "5." -> "5", "2.5" stays.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py
COMMA_BETWEEN_DIGITS_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # m4c_evaluator.py
# vqaEval.py passes re.UNICODE (= 32) as sub()'s positional `count`: at most 32 periods are removed.
PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str, comma_between_digits: re.Pattern) -> str:
    """processPunctuation with a given digit-comma pattern (the two official copies differ in it)."""
    out = text
    # A punctuation mark next to a space, or any text with a comma between digits, loses the mark;
    # otherwise the mark becomes a space ("red,blue" -> "red blue", "1,000" -> "1000").
    drop = comma_between_digits.search(text) is not None
    for mark in PUNCTUATION:
        if drop or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, PERIOD_STRIP_COUNT)


def vqa_process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: drop or space out punctuation, strip periods not before a digit."""
    return _process_punctuation(text, COMMA_BETWEEN_DIGITS)


def vqa_process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words 0-10 to digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def _strip_whitespace(text: str) -> str:
    """The official first step: newlines and tabs become spaces, then the ends are stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(text: str) -> str:
    """The official VQA answer normalisation: whitespace, punctuation, then digits/articles/contractions."""
    return vqa_process_digit_article(vqa_process_punctuation(_strip_whitespace(text)))


def evalai_normalize(text: str) -> str:
    """The EvalAI answer processor (m4c): lowercase, drop "," and "?", split "'s", then the VQA steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _process_punctuation(_strip_whitespace(text), COMMA_BETWEEN_DIGITS_EVALAI)
    return vqa_process_digit_article(text)


def soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(1, matches among the other annotators / 3), averaged over leaving out each annotator.

    With m of n answers equal to the prediction this is
    (m * min(1, (m - 1) / 3) + (n - m) * min(1, m / 3)) / n; both sides must already be normalised.
    """
    if not answers:
        raise ValueError("soft_accuracy: no ground-truth answers")
    matches = sum(answer == prediction for answer in answers)
    per_subset = [min(1.0, (matches - (answer == prediction)) / 3.0) for answer in answers]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy exactly as vqaEval.evaluate computes it.

    Quirk kept from the official code: both sides are normalised only when the annotators disagree
    (more than one distinct raw answer); unanimous answers are compared after whitespace stripping only.
    """
    answers = [_strip_whitespace(answer) for answer in answers]
    prediction = _strip_whitespace(prediction)
    if len(set(answers)) > 1:
        answers = [vqa_normalize(answer) for answer in answers]
        prediction = vqa_normalize(prediction)
    return soft_accuracy(prediction, answers)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy as m4c's TextVQAAccuracyEvaluator: EvalAI-normalise both, soft accuracy."""
    return soft_accuracy(evalai_normalize(prediction), [evalai_normalize(answer) for answer in answers])


# ------------------------------------------------------------------------------------------------
# Answer parsing for GQA, POPE, ScienceQA
# ------------------------------------------------------------------------------------------------


def gqa_normalize(text: str) -> str:
    """LLaVA's GQA conversion: trailing periods stripped, lowercased (whitespace stripped first)."""
    return text.strip().rstrip(".").lower()


def pope_parse_yes_no(text: str) -> str:
    """POPE's rule: keep the first sentence, drop commas; "no" if its words hold "No", "no" or "not"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
SCIENCEQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # "." matches any character, as in LLaVA


def scienceqa_parse_letter(text: str) -> str:
    """LLaVA's letter extraction: "A"; "A. text"; or exactly one "The answer is A." match; else "FAILED"."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = SCIENCEQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_choice_index(letter: str, num_choices: int) -> int:
    """The chosen option's index, or -1 for a letter past the last choice or a failed parse."""
    options = SCIENCEQA_OPTIONS[:num_choices]
    return options.index(letter) if letter in options else -1


# ------------------------------------------------------------------------------------------------
# Edit distance, WER, CER
# ------------------------------------------------------------------------------------------------


def edit_distance(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> int:
    """Levenshtein distance: the fewest substitutions, insertions and deletions turning one into the other.

    Bit-parallel (Myers 1999, global form of Hyyro 2001): one Python integer holds a whole DP column as
    vertical +1/-1 deltas, so each hypothesis token costs a few integer operations whatever the reference
    length; a LibriSpeech test set scores in well under a second instead of seconds.
    """
    if not reference:
        return len(hypothesis)
    positions: dict[Hashable, int] = {}  # token -> bit mask of the reference positions holding it
    for index, token in enumerate(reference):
        positions[token] = positions.get(token, 0) | (1 << index)
    all_rows = (1 << len(reference)) - 1
    last_row = 1 << (len(reference) - 1)
    plus_vertical, minus_vertical = all_rows, 0  # column 0: D[i][0] = i, every vertical step is +1
    distance = len(reference)  # D[m][j], tracked along the bottom row
    for token in hypothesis:
        equal = positions.get(token, 0)
        crossed_vertical = equal | minus_vertical
        crossed_horizontal = (((equal & plus_vertical) + plus_vertical) ^ plus_vertical) | equal
        plus_horizontal = minus_vertical | ~(crossed_horizontal | plus_vertical)
        minus_horizontal = plus_vertical & crossed_horizontal
        if plus_horizontal & last_row:
            distance += 1
        elif minus_horizontal & last_row:
            distance -= 1
        # Row 0 is D[0][j] = j: its horizontal step is always +1, shifted in at the bottom bit.
        plus_horizontal = (plus_horizontal << 1) | 1
        minus_horizontal <<= 1
        plus_vertical = (minus_horizontal | ~(crossed_vertical | plus_horizontal)) & all_rows
        minus_vertical = plus_horizontal & crossed_vertical & all_rows
    return distance


def normalize_transcript(text: str) -> str:
    """Optional ASR normalisation: lowercase, drop Unicode punctuation (category P*), collapse spaces."""
    text = "".join(char for char in text.lower() if not unicodedata.category(char).startswith("P"))
    return " ".join(text.split())


def _error_rate(references: Sequence[str], hypotheses: Sequence[str], tokenize: Callable[[str], Sequence[str]],
                normalize: bool) -> tuple[float, list[tuple[int, int]]]:
    """Corpus error rate and per-utterance (edits, reference length) for one tokenisation."""
    if len(references) != len(hypotheses):
        raise ValueError(f"error rate: {len(references)} references but {len(hypotheses)} hypotheses")
    counts = []
    for reference, hypothesis in zip(references, hypotheses):
        if normalize:
            reference, hypothesis = normalize_transcript(reference), normalize_transcript(hypothesis)
        ref_tokens, hyp_tokens = tokenize(reference), tokenize(hypothesis)
        counts.append((edit_distance(ref_tokens, hyp_tokens), len(ref_tokens)))
    total_length = sum(length for _, length in counts)
    if total_length == 0:
        raise ValueError("error rate: the references are empty, the rate is undefined")
    return sum(edits for edits, _ in counts) / total_length, counts


def _words(text: str) -> list[str]:
    """Whitespace-separated words."""
    return text.split()


def _characters(text: str) -> list[str]:
    """Characters with runs of whitespace collapsed to one space and the ends stripped."""
    return list(" ".join(text.split()))


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = False) -> float:
    """WER: word edits summed over the corpus / total reference words (words split on whitespace)."""
    return _error_rate(references, hypotheses, _words, normalize)[0]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = False
                         ) -> float:
    """CER: character edits (spaces included, runs collapsed) summed over the corpus / reference chars."""
    return _error_rate(references, hypotheses, _characters, normalize)[0]


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------


def _read_json(path: str | Path) -> Any:
    """json.load with the file named in the error."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _require(record: Mapping[str, Any], field: str, kind: type | tuple[type, ...], where: str) -> Any:
    """record[field], checked to be of `kind`; the error names the file, record and field."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise ValueError(f"{where}: missing field '{field}'")
    value = record[field]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = "/".join(k.__name__ for k in _as_tuple(kind))
        raise ValueError(f"{where}: field '{field}' should be {names}, got {value!r}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    """A type or a tuple of types, as a tuple."""
    return kind if isinstance(kind, tuple) else (kind,)


def _ten_answers(answers: Any, where: str, field: str) -> None:
    """VQAv2 and TextVQA questions carry exactly 10 human answers (m4c asserts it)."""
    if len(answers) != 10:
        raise ValueError(f"{where}: field '{field}' should hold 10 answers, got {len(answers)}")


def load_vqav2(questions_path: str | Path, annotations_path: str | Path) -> list[Record]:
    """VQAv2 questions + annotations JSON (the official pair) -> records in question order."""
    questions = _require(_read_json(questions_path), "questions", list, str(questions_path))
    annotations = _require(_read_json(annotations_path), "annotations", list, str(annotations_path))
    by_id = {}
    for index, annotation in enumerate(annotations):
        where = f"{annotations_path}: annotations[{index}]"
        question_id = _require(annotation, "question_id", int, where)
        where = f"{annotations_path}: question_id {question_id}"
        answers = _require(annotation, "answers", list, where)
        _ten_answers(answers, where, "answers")
        texts = [_require(answer, "answer", str, f"{where}: answers[{k}]")
                 for k, answer in enumerate(answers)]
        by_id[question_id] = {
            "answers": texts,
            "answer_type": _require(annotation, "answer_type", str, where),
            "question_type": _require(annotation, "question_type", str, where),
        }
    records = []
    for index, question in enumerate(questions):
        where = f"{questions_path}: questions[{index}]"
        question_id = _require(question, "question_id", int, where)
        if question_id not in by_id:
            raise ValueError(f"{questions_path}: question_id {question_id} has no annotation in "
                             f"{annotations_path}")
        records.append({
            "id": question_id,
            "image_id": _require(question, "image_id", int, where),
            "question": _require(question, "question", str, where),
            **by_id[question_id],
        })
    return records


def load_textvqa(path: str | Path) -> list[Record]:
    """TextVQA JSON ({"data": [...]} with 10 `answers` per question) -> records."""
    data = _require(_read_json(path), "data", list, str(path))
    records = []
    for index, item in enumerate(data):
        where = f"{path}: data[{index}]"
        question_id = _require(item, "question_id", int, where)
        where = f"{path}: question_id {question_id}"
        answers = _require(item, "answers", list, where)
        _ten_answers(answers, where, "answers")
        for k, answer in enumerate(answers):
            if not isinstance(answer, str):
                raise ValueError(f"{where}: field 'answers'[{k}] should be str, got {answer!r}")
        records.append({
            "id": question_id,
            "image_id": _require(item, "image_id", str, where),
            "question": _require(item, "question", str, where),
            "answers": list(answers),
        })
    return records


def load_gqa(path: str | Path) -> list[Record]:
    """GQA questions JSON (a dict keyed by question id) -> records; `balanced` defaults to True."""
    questions = _read_json(path)
    if not isinstance(questions, Mapping):
        raise ValueError(f"{path}: expected a JSON object keyed by question id")
    records = []
    for question_id, question in questions.items():
        where = f"{path}: question {question_id}"
        if not isinstance(question, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(question).__name__}")
        structural = None
        if "types" in question:
            types = _require(question, "types", Mapping, where)
            structural = _require(types, "structural", str, f"{where}: types")
        balanced = question.get("isBalanced", True)
        if not isinstance(balanced, bool):
            raise ValueError(f"{where}: field 'isBalanced' should be bool, got {balanced!r}")
        records.append({
            "id": question_id,
            "image_id": _require(question, "imageId", str, where),
            "question": _require(question, "question", str, where),
            "answer": _require(question, "answer", str, where),
            "balanced": balanced,
            "structural": structural,
        })
    return records


def load_pope(path: str | Path) -> list[Record]:
    """POPE JSONL (one {"question_id", "image", "text", "label"} per line) -> records."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from error
            label = _require(item, "label", str, where)
            if label not in ("yes", "no"):
                raise ValueError(f"{where}: field 'label' should be 'yes' or 'no', got {label!r}")
            records.append({
                "id": _require(item, "question_id", int, where),
                "image": _require(item, "image", str, where),
                "question": _require(item, "text", str, where),
                "label": label,
            })
    return records


def load_scienceqa(path: str | Path, split: str | None = "test") -> list[Record]:
    """ScienceQA problems.json (a dict keyed by problem id) -> records of one split (None: all)."""
    problems = _read_json(path)
    if not isinstance(problems, Mapping):
        raise ValueError(f"{path}: expected a JSON object keyed by problem id")
    records = []
    for problem_id, problem in problems.items():
        where = f"{path}: problem {problem_id}"
        problem_split = _require(problem, "split", str, where)
        if split is not None and problem_split != split:
            continue
        choices = _require(problem, "choices", list, where)
        if not 2 <= len(choices) <= len(SCIENCEQA_OPTIONS) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: field 'choices' should be 2 to 5 strings, got {choices!r}")
        answer = _require(problem, "answer", int, where)
        if not 0 <= answer < len(choices):
            raise ValueError(f"{where}: field 'answer' should index one of {len(choices)} choices, "
                             f"got {answer}")
        image = problem.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: field 'image' should be a file name or null, got {image!r}")
        records.append({
            "id": problem_id,
            "question": _require(problem, "question", str, where),
            "choices": list(choices),
            "answer": answer,
            "image": image,
            "split": problem_split,
        })
    return records


def load_librispeech(path: str | Path) -> list[Record]:
    """LibriSpeech transcripts ("ID TEXT" lines in *.trans.txt; a folder is searched recursively)."""
    path = Path(path)
    files = sorted(path.rglob("*.trans.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no *.trans.txt transcript files found")
    records = []
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                parts = line.strip().split(" ", 1)
                if len(parts) != 2 or not parts[1].strip():
                    raise ValueError(f"{file}: line {line_number}: expected 'ID TEXT', got {line.strip()!r}")
                records.append({"id": parts[0], "text": parts[1].strip()})
    return records


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


Predictions = Mapping[Any, str]
Scored = tuple[TableRow, list[Record]]


def _prediction(predictions: Predictions, record_id: Any, benchmark: str) -> str:
    """The prediction for one record id (an int id may also be keyed by its string, as JSON objects are)."""
    for key in (record_id, str(record_id)):
        if key in predictions:
            value = predictions[key]
            if not isinstance(value, str):
                raise ValueError(f"{benchmark}: prediction for id {record_id!r} should be str, got {value!r}")
            return value
    raise ValueError(f"{benchmark}: no prediction for id {record_id!r} ({type(record_id).__name__}); "
                     f"every record needs one")


def _mean_score(items: Sequence[Record]) -> float:
    """The mean of the items' "score" (NaN for no items)."""
    return sum(item["score"] for item in items) / len(items) if items else float("nan")


def _score_vqav2(predictions: Predictions, records: Sequence[Record]) -> Scored:
    """EvalAI-process each prediction (as LLaVA does before submitting), then vqaEval's accuracy."""
    per_item = []
    for record in records:
        raw = _prediction(predictions, record["id"], "vqav2")
        submitted = evalai_normalize(raw)
        per_item.append({"id": record["id"], "prediction": raw, "parsed": submitted,
                         "answer_type": record["answer_type"],
                         "score": vqa_accuracy(submitted, record["answers"])})
    row: TableRow = {"benchmark": "vqav2", "n": len(per_item), "accuracy": _mean_score(per_item)}
    for answer_type in sorted({item["answer_type"] for item in per_item}):
        row[f"accuracy_{answer_type}"] = _mean_score([i for i in per_item if i["answer_type"] == answer_type])
    return row, per_item


def _score_textvqa(predictions: Predictions, records: Sequence[Record]) -> Scored:
    """m4c's TextVQA accuracy per question, averaged."""
    per_item = []
    for record in records:
        raw = _prediction(predictions, record["id"], "textvqa")
        per_item.append({"id": record["id"], "prediction": raw, "parsed": evalai_normalize(raw),
                         "score": textvqa_accuracy(raw, record["answers"])})
    return {"benchmark": "textvqa", "n": len(per_item), "accuracy": _mean_score(per_item)}, per_item


def _score_gqa(predictions: Predictions, records: Sequence[Record]) -> Scored:
    """Exact match after LLaVA's cleaning, over balanced questions, split into binary and open."""
    per_item = []
    for record in records:
        raw = _prediction(predictions, record["id"], "gqa")
        parsed = gqa_normalize(raw)
        per_item.append({"id": record["id"], "prediction": raw, "parsed": parsed,
                         "balanced": record["balanced"], "structural": record["structural"],
                         "score": float(parsed == record["answer"])})
    balanced = [item for item in per_item if item["balanced"]]
    row: TableRow = {"benchmark": "gqa", "n": len(balanced), "accuracy": _mean_score(balanced)}
    if all(item["structural"] is not None for item in balanced):
        # eval.py: "open" are the structural type "query", every other type is "binary".
        row["accuracy_binary"] = _mean_score([i for i in balanced if i["structural"] != "query"])
        row["accuracy_open"] = _mean_score([i for i in balanced if i["structural"] == "query"])
    return row, per_item


def pope_metrics(predicted: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no answers with "yes" as the positive class.

    Precision, recall and F1 are 0 where their denominator is 0 (POPE's script would divide by zero).
    """
    if len(predicted) != len(labels) or not labels:
        raise ValueError(f"pope_metrics: {len(predicted)} predictions for {len(labels)} labels")
    pairs = list(zip(predicted, labels))
    true_pos = sum(p == "yes" and l == "yes" for p, l in pairs)
    false_pos = sum(p == "yes" and l == "no" for p, l in pairs)
    true_neg = sum(p == "no" and l == "no" for p, l in pairs)
    false_neg = sum(p == "no" and l == "yes" for p, l in pairs)
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (true_pos + true_neg) / len(pairs), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (true_pos + false_pos) / len(pairs),
            "tp": true_pos, "fp": false_pos, "tn": true_neg, "fn": false_neg}


def _score_pope(predictions: Predictions, records: Sequence[Record]) -> Scored:
    """POPE's yes/no parsing, then the confusion-matrix metrics."""
    per_item = []
    for record in records:
        raw = _prediction(predictions, record["id"], "pope")
        parsed = pope_parse_yes_no(raw)
        per_item.append({"id": record["id"], "prediction": raw, "parsed": parsed, "label": record["label"],
                         "score": float(parsed == record["label"])})
    metrics = pope_metrics([i["parsed"] for i in per_item], [i["label"] for i in per_item])
    return {"benchmark": "pope", "n": len(per_item), **metrics}, per_item


def _score_scienceqa(predictions: Predictions, records: Sequence[Record]) -> Scored:
    """LLaVA's letter parsing; accuracy over all problems and over those with an image."""
    per_item = []
    for record in records:
        raw = _prediction(predictions, record["id"], "scienceqa")
        letter = scienceqa_parse_letter(raw)
        chosen = scienceqa_choice_index(letter, len(record["choices"]))
        per_item.append({"id": record["id"], "prediction": raw, "parsed": letter,
                         "has_image": record["image"] is not None,
                         "score": float(chosen == record["answer"])})
    row: TableRow = {"benchmark": "scienceqa", "n": len(per_item), "accuracy": _mean_score(per_item)}
    with_image = [item for item in per_item if item["has_image"]]
    if with_image:
        row["accuracy_img"] = _mean_score(with_image)
    return row, per_item


def _score_asr(predictions: Predictions, records: Sequence[Record], normalize: bool, benchmark: str
               ) -> Scored:
    """Corpus WER and CER; each item's score is its own WER."""
    references = [record["text"] for record in records]
    hypotheses = [_prediction(predictions, record["id"], benchmark) for record in records]
    wer, word_counts = _error_rate(references, hypotheses, _words, normalize)
    cer, char_counts = _error_rate(references, hypotheses, _characters, normalize)
    per_item = []
    for record, hypothesis, (word_edits, words), (char_edits, chars) in zip(
            records, hypotheses, word_counts, char_counts):
        per_item.append({"id": record["id"], "prediction": hypothesis,
                         "word_edits": word_edits, "words": words, "char_edits": char_edits, "chars": chars,
                         "score": word_edits / words if words else float("nan")})
    return {"benchmark": benchmark, "n": len(per_item), "wer": wer, "cer": cer}, per_item


BENCHMARKS = ("vqav2", "gqa", "pope", "scienceqa", "textvqa", "librispeech")


def score(benchmark: str, predictions: Predictions, records: Sequence[Record], *,
          normalize_transcripts: bool = True) -> Scored:
    """Score one benchmark: predictions[id] is the model's text for the record with that id.

    Returns the table row (fractions in [0, 1]; "n" items; for POPE also the confusion counts) and one
    dict per item with the raw prediction, its parsed form and its score (WER for LibriSpeech).
    `normalize_transcripts` (LibriSpeech only) lowercases and strips punctuation on both sides.
    """
    if not records:
        raise ValueError(f"{benchmark}: no records to score")
    if benchmark == "vqav2":
        return _score_vqav2(predictions, records)
    if benchmark == "textvqa":
        return _score_textvqa(predictions, records)
    if benchmark == "gqa":
        return _score_gqa(predictions, records)
    if benchmark == "pope":
        return _score_pope(predictions, records)
    if benchmark == "scienceqa":
        return _score_scienceqa(predictions, records)
    if benchmark == "librispeech":
        return _score_asr(predictions, records, normalize_transcripts, benchmark)
    raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")


COUNT_COLUMNS = ("n", "tp", "fp", "tn", "fn")


def format_table(rows: Sequence[TableRow]) -> str:
    """A markdown table of score() rows: one row per benchmark, metrics as percentages with 2 decimals."""
    if not rows:
        raise ValueError("format_table: no rows")
    columns = ["benchmark"]
    for row in rows:
        columns += [key for key in row if key not in columns]
    header = [column if column in ("benchmark",) + COUNT_COLUMNS else f"{column} (%)" for column in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append("")
            elif column == "benchmark" or column in COUNT_COLUMNS:
                cells.append(str(value))
            else:
                cells.append(f"{100.0 * value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
