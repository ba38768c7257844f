"""Benchmark scorers against hand-computed values, the official scripts' documented behaviour, and jiwer.

Expected values are worked out by hand from the official code paths (GT-Vision-Lab/VQA vqaEval.py,
m4c_evaluator.py, RUCAIBox/POPE evaluate.py, LLaVA eval_science_qa.py / convert_gqa_for_eval.py);
the arithmetic is written next to each assertion. WER/CER are also compared with jiwer.
"""

import itertools
import json
import random
from fractions import Fraction
from pathlib import Path

import pytest

from jaxrl_peft.eval import mm_scorers

FIXTURES = Path(__file__).parent / "fixtures"


def subset_oracle(prediction: str, answers: list[str]) -> Fraction:
    """Exact VQA accuracy: mean over all C(n, n-1) annotator subsets of min(1, matches in subset / 3)."""
    subsets = list(itertools.combinations(range(len(answers)), len(answers) - 1))
    total = sum(min(Fraction(1), Fraction(sum(answers[i] == prediction for i in subset), 3))
                for subset in subsets)
    return total / len(subsets)


# ------------------------------------------------------------------------------------------------
# VQA soft accuracy and normalisation
# ------------------------------------------------------------------------------------------------


def test_soft_accuracy_worked_arithmetic():
    # 2 of 10 annotators say "cat". Leaving out one of the 2 matching annotators leaves 1 match among
    # the other 9 (min(1, 1/3) = 1/3); leaving out one of the 8 others leaves 2 (2/3).
    # acc = (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6.
    answers = ["cat", "cat"] + ["dog"] * 8
    assert mm_scorers.soft_accuracy("cat", answers) == pytest.approx(0.6, abs=1e-12)
    # 1 match: (1 * 0 + 9 * 1/3) / 10 = 0.3.   3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    assert mm_scorers.soft_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3, abs=1e-12)
    assert mm_scorers.soft_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9, abs=1e-12)
    # 4 matches: every subset of 9 still holds >= 3 -> 1.0.   0 matches -> 0.
    assert mm_scorers.soft_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert mm_scorers.soft_accuracy("bird", answers) == 0.0


def test_soft_accuracy_matches_the_subset_oracle():
    rng = random.Random(0)
    for _ in range(200):
        answers = [rng.choice("abc") for _ in range(10)]
        prediction = rng.choice("abcd")
        assert mm_scorers.soft_accuracy(prediction, answers) == pytest.approx(
            float(subset_oracle(prediction, answers)), abs=1e-12), (prediction, answers)


@pytest.mark.parametrize("raw, expected", [
    ("two", "2"),  # manualMap: number words zero..ten -> digits
    ("none", "0"),
    ("twenty two", "twenty 2"),  # manualMap is applied word by word, "twenty" has no entry
    ("Ten", "10"),  # lowercased before the map
    ("dont", "don't"),  # contractions map
    ("whats", "what's"),
    ("it's", "it's"),  # already a contraction: unchanged ("'" is not in the punctuation list)
    ("Im", "im"),  # the map's "Im" key is never hit: words are lowercased first
    ("the dog", "dog"),  # articles a / an / the dropped
    ("a cat", "cat"),
    ("An apple", "apple"),
    ("1,000", "1000"),  # a comma between digits: every punctuation mark is deleted, not spaced
    ("1,000 - 2", "1000 2"),
    ("red,blue", "red blue"),  # no space next to the comma and no digit comma: the comma becomes a space
    ("red, blue", "red blue"),  # a comma next to a space is deleted
    ("left-hand", "left hand"),
    ("black - white", "black white"),
    ("hello-world, foo", "hello world foo"),  # the rule is decided per mark
    ("yes.", "yes"),  # periods not followed by a digit are stripped
    ("5.", "5"),
    ("2.5", "2.5"),  # a decimal point stays
    ("u.s.a.", "usa"),
    ("  fire\thydrant\n", "fire hydrant"),
])
def test_vqa_normalize_official_cases(raw, expected):
    assert mm_scorers.vqa_normalize(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("It's red", "it 's red"),  # word_tokenize splits "'s"
    ("How many?", "how many"),
    ("red,blue", "redblue"),  # word_tokenize deletes commas before the punctuation rules run
    ("1,000", "1000"),
    ("The Coca-Cola", "coca cola"),
    ("Two.", "2"),
])
def test_evalai_normalize_cases(raw, expected):
    assert mm_scorers.evalai_normalize(raw) == expected


def test_vqa_accuracy_normalises_only_when_annotators_disagree():
    # vqaEval.py: `if len(set(gtAnswers)) > 1:` guards the normalisation of both sides.
    assert mm_scorers.vqa_accuracy("two", ["2"] * 10) == 0.0
    assert mm_scorers.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert mm_scorers.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # whitespace is always stripped
    # With disagreement "two" -> "2" and "the 2" -> "2": 3 matches -> 0.9.
    assert mm_scorers.vqa_accuracy("two", ["2", "the 2", "two"] + ["3"] * 7) == pytest.approx(0.9, abs=1e-12)


def test_vqav2_fixture_end_to_end():
    records = mm_scorers.load_vqav2(FIXTURES / "vqav2_OpenEnded_mscoco_val2014_questions.json",
                                    FIXTURES / "vqav2_mscoco_val2014_annotations.json")
    assert [r["id"] for r in records] == [262148000, 262148001, 393225000, 393225001]
    predictions = {
        262148000: "Yes",  # EvalAI -> "yes"; 10 unanimous "yes" -> 1.0
        262148001: "two",  # EvalAI -> "2"; 2 of 10 say "2" -> 0.6
        393225000: "Red.",  # EvalAI -> "red"; 3 of 10 -> 0.9
        393225001: "umbrellas",  # 1 of 10 ("an umbrella" normalises to "umbrella") -> 0.3
    }
    row, per_item = mm_scorers.score("vqav2", predictions, records)
    assert [item["score"] for item in per_item] == pytest.approx([1.0, 0.6, 0.9, 0.3], abs=1e-12)
    assert [item["parsed"] for item in per_item] == ["yes", "2", "red", "umbrellas"]
    assert row["n"] == 4
    assert row["accuracy"] == pytest.approx((1.0 + 0.6 + 0.9 + 0.3) / 4, abs=1e-12)  # 0.7
    assert row["accuracy_yes/no"] == pytest.approx(1.0)
    assert row["accuracy_number"] == pytest.approx(0.6)
    assert row["accuracy_other"] == pytest.approx((0.9 + 0.3) / 2)


def test_textvqa_fixture_end_to_end():
    records = mm_scorers.load_textvqa(FIXTURES / "TextVQA_0.5.1_val.json")
    predictions = {
        "34602": "Coca-Cola",  # string keys (as from a JSON object) find int ids
        "34603": "1000",  # "1,000" x2 -> "1000"; "1 000" stays apart: 2 of 10 -> 0.6
        "34604": "Go",  # 0 of 10
    }
    row, per_item = mm_scorers.score("textvqa", predictions, records)
    # "coca-cola" x4 and "coca cola" x3 both normalise to "coca cola": 7 of 10 -> 1.0
    assert [item["score"] for item in per_item] == pytest.approx([1.0, 0.6, 0.0], abs=1e-12)
    assert row["accuracy"] == pytest.approx(1.6 / 3, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# GQA, POPE, ScienceQA
# ------------------------------------------------------------------------------------------------


def test_gqa_fixture_end_to_end():
    records = mm_scorers.load_gqa(FIXTURES / "gqa_testdev_balanced_questions.json")
    predictions = {
        "20968379": "Yes.",  # -> "yes" == "yes"          (verify: binary)
        "20968380": "The laptop",  # -> "the laptop" != "laptop" (query: open; GQA keeps articles)
        "20968381": "White",  # -> "white" == "white"        (query: open)
        "20968382": "No",  # -> "no" == "no"              (logical: binary)
        "20968383": "no",  # wrong, but not balanced: not counted
    }
    row, per_item = mm_scorers.score("gqa", predictions, records)
    assert [item["score"] for item in per_item] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert row == {"benchmark": "gqa", "n": 4, "accuracy": 0.75, "accuracy_binary": 1.0, "accuracy_open": 0.5}


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),  # "No," loses its comma -> "No"
    ("There is not a dog in the image.", "no"),
    ("no.", "no"),
    ("NO", "yes"),  # only "No", "no" and "not" count
    ("I don't think so", "yes"),
    ("Yes. There is no cat.", "yes"),  # only the first sentence
])
def test_pope_parse_yes_no(text, expected):
    assert mm_scorers.pope_parse_yes_no(text) == expected


def test_pope_fixture_confusion_counts():
    records = mm_scorers.load_pope(FIXTURES / "coco_pope_random.jsonl")
    assert [r["label"] for r in records] == ["yes", "no"] * 5
    predictions = {
        1: "Yes", 3: "Yes, there is a person.", 5: "yes",  # label yes, said yes: TP = 3
        7: "No, there is no cup.", 9: "There is not a chair.",  # label yes, said no: FN = 2
        2: "Yes, there is a car.",  # label no, said yes: FP = 1
        4: "No", 6: "no.", 8: "No, there is no bus.", 10: "There is no train in the image.",  # TN = 4
    }
    row, _ = mm_scorers.score("pope", predictions, records)
    assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (3, 1, 4, 2)
    # precision = 3 / (3 + 1) = 0.75, recall = 3 / (3 + 2) = 0.6,
    # F1 = 2 * 0.75 * 0.6 / (0.75 + 0.6) = 0.9 / 1.35 = 2/3, accuracy = 7 / 10, yes-ratio = 4 / 10.
    assert row["precision"] == pytest.approx(0.75)
    assert row["recall"] == pytest.approx(0.6)
    assert row["f1"] == pytest.approx(2 / 3)
    assert row["accuracy"] == pytest.approx(0.7)
    assert row["yes_ratio"] == pytest.approx(0.4)


def test_pope_metrics_without_positive_predictions():
    metrics = mm_scorers.pope_metrics(["no", "no"], ["yes", "no"])
    assert (metrics["precision"], metrics["recall"], metrics["f1"]) == (0.0, 0.0, 0.0)
    assert metrics["accuracy"] == 0.5


@pytest.mark.parametrize("text, expected", [
    ("A", "A"),
    ("B. table", "B"),
    ("The answer is C.", "C"),
    ("Because ... The answer is D. Done", "D"),
    ("The answer is C", "FAILED"),  # LLaVA's pattern needs one character after the letter
    ("(A)", "FAILED"),  # not one of LLaVA's formats
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ("a", "FAILED"),
])
def test_scienceqa_parse_letter(text, expected):
    assert mm_scorers.scienceqa_parse_letter(text) == expected


def test_scienceqa_fixture_end_to_end():
    records = mm_scorers.load_scienceqa(FIXTURES / "scienceqa_problems.json")
    assert [r["id"] for r in records] == ["1", "2", "3", "4", "5"]  # "6" is in the train split
    assert len(mm_scorers.load_scienceqa(FIXTURES / "scienceqa_problems.json", split=None)) == 6
    predictions = {
        "1": "B",  # index 1 == answer 1: right (has an image)
        "2": "B. table",  # right
        "3": "The answer is B.",  # right
        "4": "(B)",  # FAILED: wrong (has an image)
        "5": "The answer is C.",  # C is past the 2 choices -> -1: wrong
    }
    row, per_item = mm_scorers.score("scienceqa", predictions, records)
    assert [item["score"] for item in per_item] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert row["accuracy"] == pytest.approx(3 / 5)
    assert row["accuracy_img"] == pytest.approx(1 / 2)


# ------------------------------------------------------------------------------------------------
# WER / CER
# ------------------------------------------------------------------------------------------------


def dp_edit_distance(reference, hypothesis) -> int:
    """The textbook O(n m) dynamic programme, as an oracle for the bit-parallel version."""
    table = [[i + j if i == 0 or j == 0 else 0 for j in range(len(hypothesis) + 1)]
             for i in range(len(reference) + 1)]
    for i in range(1, len(reference) + 1):
        for j in range(1, len(hypothesis) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                              table[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1]))
    return table[-1][-1]


def test_edit_distance_matches_the_dynamic_programme():
    rng = random.Random(2)
    for _ in range(200):  # lengths past 64 exercise multi-word integers
        reference = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        hypothesis = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        assert mm_scorers.edit_distance(reference, hypothesis) == dp_edit_distance(reference, hypothesis)


def test_edit_distance_known_cases():
    assert mm_scorers.edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert mm_scorers.edit_distance("", "abc") == 3
    assert mm_scorers.edit_distance("abc", "") == 3
    assert mm_scorers.edit_distance("flaw", "lawn") == 2


def test_wer_substitution_insertion_deletion():
    ref = "the cat sat on the mat"
    word_error_rate = mm_scorers.word_error_rate
    assert word_error_rate([ref], ["the cat sit on the mat"]) == pytest.approx(1 / 6)  # substitution
    assert word_error_rate([ref], ["the cat sat on on the mat"]) == pytest.approx(1 / 6)  # insertion
    assert word_error_rate([ref], ["the cat sat on mat"]) == pytest.approx(1 / 6)  # deletion
    assert word_error_rate([ref], ["the cat sit on mat"]) == pytest.approx(2 / 6)
    # Corpus WER sums edits and reference words: (2 + 1) / (6 + 2) = 3/8, not the mean (1/3 + 1/2) / 2.
    assert word_error_rate([ref, "a b"], ["the cat sit on mat", "a x b"]) == pytest.approx(3 / 8)
    # More hypothesis words than reference words: WER can pass 1.
    assert word_error_rate(["a"], ["x y z"]) == pytest.approx(3.0)


def test_cer_known_cases():
    assert mm_scorers.character_error_rate(["kitten"], ["sitting"]) == pytest.approx(3 / 6)
    # Spaces are characters: "ab cd" -> "abcd" is one deletion out of 5.
    assert mm_scorers.character_error_rate(["ab cd"], ["abcd"]) == pytest.approx(1 / 5)
    # Runs of whitespace count as one space and the ends are stripped (jiwer.cer would count 1/5 here).
    assert mm_scorers.character_error_rate(["ab cd"], [" ab  cd "]) == 0.0
    assert mm_scorers.character_error_rate(["Hello, World!"], ["hello world"], normalize=True) == 0.0


def test_wer_cer_match_jiwer():
    jiwer = pytest.importorskip("jiwer")
    rng = random.Random(1)
    vocab = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far"]
    refs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9))) for _ in range(30)]
    hyps = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9))) for _ in range(30)]
    assert mm_scorers.word_error_rate(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert mm_scorers.character_error_rate(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)


def test_librispeech_fixture_end_to_end():
    records = mm_scorers.load_librispeech(FIXTURES)
    assert [r["id"] for r in records] == ["1089-134686-0000", "1089-134686-0001", "1089-134686-0002"]
    predictions = {
        "1089-134686-0000": "He hoped there would be stew for dinner.",
        "1089-134686-0001": "Stuff it into you, his belly counselled him!",
        # nightfall -> night (sub), + fall (ins), lamps -> lamp (sub): 3 word edits;
        # characters: + " " and - "s": 2 character edits.
        "1089-134686-0002": "After early night fall the yellow lamp would light up here and there",
    }
    row, per_item = mm_scorers.score("librispeech", predictions, records)
    assert [item["word_edits"] for item in per_item] == [0, 0, 3]
    assert [item["words"] for item in per_item] == [8, 8, 12]
    assert row["wer"] == pytest.approx(3 / 28)
    chars = sum(len(r["text"]) for r in records)  # upper-case, unpunctuated, single-spaced references
    assert row["cer"] == pytest.approx(2 / chars)
    raw_row, _ = mm_scorers.score("librispeech", predictions, records, normalize_transcripts=False)
    # Without normalisation every word differs in case: 8 + 8 substitutions, then 12 substitutions and
    # 1 insertion for the 13-word third hypothesis: (8 + 8 + 13) / 28.
    assert raw_row["wer"] == pytest.approx(29 / 28)


# ------------------------------------------------------------------------------------------------
# Loader errors, score() errors, the table
# ------------------------------------------------------------------------------------------------


def test_pope_loader_names_file_line_and_field(tmp_path):
    path = tmp_path / "pope.jsonl"
    lines = [{"question_id": 1, "image": "x.jpg", "text": "Is there a cat?", "label": "yes"},
             {"question_id": 2, "image": "x.jpg", "text": "Is there a dog?", "label": "maybe"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(ValueError, match=r"pope\.jsonl: line 2: field 'label' should be 'yes' or 'no'"):
        mm_scorers.load_pope(path)


def test_vqav2_loader_rejects_nine_answers(tmp_path):
    questions = json.loads((FIXTURES / "vqav2_OpenEnded_mscoco_val2014_questions.json").read_text())
    annotations = json.loads((FIXTURES / "vqav2_mscoco_val2014_annotations.json").read_text())
    annotations["annotations"][1]["answers"].pop()
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=r"a\.json: question_id 262148001: field 'answers' should hold 10"):
        mm_scorers.load_vqav2(tmp_path / "q.json", tmp_path / "a.json")


def test_other_loaders_name_the_bad_record(tmp_path):
    problems = json.loads((FIXTURES / "scienceqa_problems.json").read_text())
    problems["3"]["answer"] = 4
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(ValueError, match=r"problem 3: field 'answer' should index one of 4 choices"):
        mm_scorers.load_scienceqa(tmp_path / "problems.json")

    questions = json.loads((FIXTURES / "gqa_testdev_balanced_questions.json").read_text())
    del questions["20968381"]["answer"]
    (tmp_path / "gqa.json").write_text(json.dumps(questions))
    with pytest.raises(ValueError, match=r"question 20968381: missing field 'answer'"):
        mm_scorers.load_gqa(tmp_path / "gqa.json")

    data = json.loads((FIXTURES / "TextVQA_0.5.1_val.json").read_text())
    data["data"][2]["answers"] = "stop"
    (tmp_path / "textvqa.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"question_id 34604: field 'answers' should be list"):
        mm_scorers.load_textvqa(tmp_path / "textvqa.json")

    (tmp_path / "1-2.trans.txt").write_text("1-2-0000 HELLO\n1-2-0001\n")
    with pytest.raises(ValueError, match=r"1-2\.trans\.txt: line 2: expected 'ID TEXT'"):
        mm_scorers.load_librispeech(tmp_path / "1-2.trans.txt")

    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        mm_scorers.load_gqa(tmp_path / "broken.json")


def test_score_rejects_missing_predictions_and_unknown_benchmarks():
    records = mm_scorers.load_pope(FIXTURES / "coco_pope_random.jsonl")
    with pytest.raises(ValueError, match=r"pope: no prediction for id 1 \(int\)"):
        mm_scorers.score("pope", {}, records)
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'"):
        mm_scorers.score("mmmu", {}, records)


def test_format_table():
    rows = [{"benchmark": "gqa", "n": 4, "accuracy": 0.75},
            {"benchmark": "pope", "n": 10, "accuracy": 0.7, "f1": 2 / 3, "tp": 3}]
    assert mm_scorers.format_table(rows) == "\n".join([
        "| benchmark | n | accuracy (%) | f1 (%) | tp |",
        "|---|---|---|---|---|",
        "| gqa | 4 | 75.00 |  |  |",
        "| pope | 10 | 70.00 | 66.67 | 3 |",
    ])
