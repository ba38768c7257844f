"""launch/eval.py --modrwkv: a tiny random ModRWKV answers benchmark files in their own formats; the JSON
holds what the model generates for the reference prompts, scored exactly as mm_scorers scores it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import soundfile
import torch
import transformers
from PIL import Image

from jaxrl_peft.eval import mm_scorers
from rwkv_jax import data, mm_eval, modrwkv, modrwkv_task
from rwkv_jax import model as rwkv

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "jaxrl_peft" / "eval" / "fixtures"
NEW_TOKENS = 4


def _world_rwkv_dir(path: Path) -> Path:
    """A tiny random RWKV-7 with the World vocabulary (the placeholder layout's ids 65530-65532 exist)."""
    cfg = rwkv.RWKV7Config(vocab_size=65536, n_embd=32, n_layer=2, head_size=16, dim_ffn=64, decay_lora=8,
                           iclr_lora=8, value_lora=8, gate_lora=8)
    params = rwkv.RWKV7(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    rng = np.random.default_rng(0)  # the official init zeroes the output projections: perturb every weight
    rwkv.save(str(path), cfg, jax.tree.map(
        lambda x: (np.asarray(x) + rng.normal(0, 0.1, np.shape(x))).astype(np.float32), nn.unbox(params)))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved ModRWKV directories: a tiny random SigLIP or Whisper with connectors from seed 1 on the embedded
    tiny RWKV-7 (pretrained on text, so its greedy answers follow the prompt and the item; random RWKV-7s of
    this size answer nearly the same whatever they are given), paper layout; and SigLIP on a random
    World-vocabulary RWKV-7 in the later placeholder layout."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("mm_eval")
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=16,
        patch_size=8)).save_pretrained(root / "siglip")
    transformers.SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "siglip")
    transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=50, num_mel_bins=80, d_model=16, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=32,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=32, max_source_positions=1500,
        max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)).save_pretrained(root / "whisper")
    tiny = ROOT / "assets" / "tiny-rwkv7"
    out = {}
    for name, encoder, llm_dir, chat_format in (
            ("vision", root / "siglip", tiny, "paper"), ("audio", root / "whisper", tiny, "paper"),
            ("later", root / "siglip", _world_rwkv_dir(root / "rwkv_world"), "later")):
        family, params = modrwkv.from_parts(encoder, llm_dir, chat_format=chat_format, seed=1)
        modrwkv.save(root / name, family, jax.device_get(params))
        out[name] = root / name
    return out


def _image(path: Path, seed: int) -> None:
    """A 20x24 image, one of four far-apart patterns (the tiny random encoder tells them apart)."""
    pixels = np.zeros((20, 24, 3), np.uint8)  # seed % 4 == 3: black
    if seed % 4 == 0:
        pixels[:] = 255
    elif seed % 4 == 1:
        pixels[:10] = 255
    elif seed % 4 == 2:
        pixels[:, :12] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The scorer fixtures with the images and audio they name."""
    root = tmp_path_factory.mktemp("mm_eval_files")
    images = root / "images"
    vqav2 = json.loads((FIXTURES / "vqav2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    for seed, image_id in zip((0, 3), sorted({q["image_id"] for q in vqav2})):  # white, black
        _image(images / f"COCO_val2014_{image_id:012d}.jpg", seed)
    for line in (FIXTURES / "coco_pope_random.jsonl").read_text().splitlines():
        _image(images / json.loads(line)["image"], 7)
    for problem_id, problem in json.loads((FIXTURES / "scienceqa_problems.json").read_text()).items():
        if problem["image"]:
            _image(root / "sqa" / problem_id / problem["image"], int(problem_id))
    chapter = root / "LibriSpeech" / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    shutil.copyfile(FIXTURES / "1089-134686.trans.txt", chapter / "1089-134686.trans.txt")
    rng = np.random.default_rng(0)
    clips = [data.dtmf_signal("0123", rng)[0], rng.normal(0, 0.5, 16000), np.zeros(24000)]  # tones, noise, silence
    for line, samples in zip((chapter / "1089-134686.trans.txt").read_text().splitlines(), clips):
        soundfile.write(chapter / f"{line.split()[0]}.flac", np.clip(samples, -1, 1), data.SAMPLING_RATE)
    return {"root": root, "images": images, "sqa": root / "sqa", "librispeech": root / "LibriSpeech" / "test-clean"}


def _eval(args, workdir):
    """Runs launch/eval.py; returns (completed process, parsed JSON or None)."""
    cmd = [sys.executable, str(ROOT / "launch" / "eval.py"), *args, f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = Path(workdir) / "eval_results.json"
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def _assert_exact_wiring(result, benchmark, records):
    """The JSON's table row and item scores are mm_scorers.score of the predictions it recorded."""
    predictions = {item["id"]: item["prediction"] for item in result["items"]}
    row, scored = mm_scorers.score(benchmark, predictions, records)
    assert result["summary"] == pytest.approx(row, nan_ok=True)
    assert [item["id"] for item in result["items"]] == [r["id"] for r in records]
    assert [item["score"] for item in result["items"]] == pytest.approx([s["score"] for s in scored], nan_ok=True)


def _greedy(model_dir):
    """(family, variables, greedy sampler of NEW_TOKENS, tokenizer) of a saved model."""
    family, params = modrwkv.load(model_dir)
    tokenizer = family.tokenizer()
    config = ml_collections.ConfigDict({"eval": {"max_new_tokens": NEW_TOKENS}})
    return family, {"params": params}, modrwkv_task.eval_sampler(family, tokenizer, config), tokenizer


def _direct_answers(model_dir, records):
    """The answers of modrwkv_task.generate_answers to hand-built records, all in one batch."""
    family, variables, sampler, tokenizer = _greedy(model_dir)
    return [a.strip() for a in modrwkv_task.generate_answers(family, variables, records, sampler, tokenizer,
                                                            batch_size=len(records))]


@pytest.mark.slow  # POPE runs the same command path in CI
def test_vqav2_command_writes_the_table_and_the_items(models, files, tmp_path):
    questions = FIXTURES / "vqav2_OpenEnded_mscoco_val2014_questions.json"
    annotations = FIXTURES / "vqav2_mscoco_val2014_annotations.json"
    proc, result = _eval([f"--modrwkv={models['vision']}", "--benchmark=vqav2", f"--questions={questions}",
                          f"--annotations={annotations}", f"--images={files['images']}", "--limit=3",
                          "--batch_size=2", f"--max_new_tokens={NEW_TOKENS}"], tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "| benchmark | n | accuracy (%) |" in proc.stdout and "| vqav2 | 3 |" in proc.stdout
    records = mm_scorers.load_vqav2(questions, annotations)[:3]
    _assert_exact_wiring(result, "vqav2", records)
    first = result["items"][0]
    assert first["question"] == "Is the man wearing a hat?\nAnswer the question using a single word or phrase."
    assert first["answers"] == ["yes"] * 10 and set(first) >= {"id", "question", "prediction", "answers", "score"}
    # the predictions are the model's answers to the reference prompt (paper layout: no marker in the text)
    # with the question's image; another prompt or another image gives other answers, so this can fail
    def record(text, image_id):
        return data.MultimodalRecord([{"from": "human", "value": text}],
                                     [str(files["images"] / f"COCO_val2014_{image_id:012d}.jpg")])

    suffix = "\nAnswer the question using a single word or phrase."
    other_image = {262148: 393225, 393225: 262148}
    direct = _direct_answers(models["vision"], [record(r["question"] + suffix, r["image_id"]) for r in records]
                             + [record(r["question"], r["image_id"]) for r in records]
                             + [record(r["question"] + suffix, other_image[r["image_id"]]) for r in records])
    predictions = [item["prediction"] for item in result["items"]]
    assert predictions == direct[:3]
    assert predictions != direct[3:6] and predictions != direct[6:]


def test_pope_command(models, files, tmp_path):
    proc, result = _eval([f"--modrwkv={models['vision']}", "--benchmark=pope",
                          f"--questions={FIXTURES / 'coco_pope_random.jsonl'}", f"--images={files['images']}",
                          "--limit=5", "--batch_size=4", f"--max_new_tokens={NEW_TOKENS}"], tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "f1 (%)" in proc.stdout and "| pope | 5 |" in proc.stdout
    records = mm_scorers.load_pope(FIXTURES / "coco_pope_random.jsonl")[:5]
    _assert_exact_wiring(result, "pope", records)
    assert [item["answer"] for item in result["items"]] == [r["label"] for r in records]
    assert {"tp", "fp", "tn", "fn", "precision", "recall", "yes_ratio"} <= set(result["summary"])


def test_librispeech_command_with_whisper(models, files, tmp_path):
    proc, result = _eval([f"--modrwkv={models['audio']}", "--benchmark=librispeech",
                          f"--transcripts={files['librispeech']}", "--batch_size=2",
                          f"--max_new_tokens={NEW_TOKENS}"], tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "wer (%)" in proc.stdout and "cer (%)" in proc.stdout
    records = mm_scorers.load_librispeech(files["librispeech"])
    assert len(records) == 3
    _assert_exact_wiring(result, "librispeech", records)
    assert result["items"][0]["answer"] == "HE HOPED THERE WOULD BE STEW FOR DINNER"
    # the reference's ASR prompt: the audio, then `\x16Assistant:` (no user turn); a user turn changes the answers
    chapter = files["librispeech"] / "1089" / "134686"
    clips = [str(chapter / f"{r['id']}.flac") for r in records]
    direct = _direct_answers(models["audio"], [data.MultimodalRecord([{"from": "gpt", "value": ""}], [], [clip])
                                               for clip in clips]
                             + [data.MultimodalRecord(data.asr_conversation(""), [], [clip]) for clip in clips])
    predictions = [item["prediction"] for item in result["items"]]
    assert predictions == direct[:3] and predictions != direct[3:]
    assert len(set(predictions)) > 1, "every clip gave the same answer: the audio does not reach the model"


def test_scienceqa_asks_problems_without_an_image_as_text(models, files):
    problems = FIXTURES / "scienceqa_problems.json"
    sources = mm_eval.Sources(questions=str(problems), images=str(files["sqa"]))
    results = mm_eval.run(str(models["vision"]), "scienceqa", sources, None, limit=4, batch_size=3,
                          max_new_tokens=NEW_TOKENS, log=None)
    records = mm_scorers.load_scienceqa(problems)[:4]
    assert [r["image"] is None for r in records] == [False, True, True, False]  # both kinds are asked
    predictions = [item["prediction"] for item in results.items]
    row, _ = mm_scorers.score("scienceqa", dict(zip([r["id"] for r in records], predictions)), records)
    assert results.row == pytest.approx(row) and "accuracy_img" in results.row
    assert results.items[0]["question"] == ("Which is a mammal?\nA. frog\nB. dog\n"
                                            "Answer with the option's letter from the given choices directly.")
    assert results.items[0]["answer"] == "B" and results.items[0]["choices"] == ["frog", "dog"]
    # a text-only problem: the same answer as a chat turn without an item, through the sampler
    family, variables, sampler, tokenizer = _greedy(models["vision"])
    alone = mm_eval.text_answers(family, variables, [results.items[1]["question"]], sampler, tokenizer, 1)
    assert predictions[1] == alone[0].strip()


def test_later_layout_puts_the_image_marker_first(models, files):
    family, _ = modrwkv.load(models["later"])
    question = mm_eval.Question({"id": 7}, "What is it?\nAnswer the question using a single word or phrase.",
                                str(files["images"] / "COCO_val2014_000000262148.jpg"))
    record = mm_eval.conversation(question, family)
    assert record.conversation == [{"from": "human", "value": "<image>\nWhat is it?\nAnswer the question using a "
                                                              "single word or phrase."}]
    assert record.images == [question.item]
    sources = mm_eval.Sources(questions=str(FIXTURES / "coco_pope_random.jsonl"), images=str(files["images"]))
    results = mm_eval.run(str(models["later"]), "pope", sources, None, limit=2, batch_size=2,
                          max_new_tokens=NEW_TOKENS, log=None)
    assert results.row["n"] == 2


def test_prompts_of_the_other_benchmarks(files, tmp_path):
    gqa = FIXTURES / "gqa_testdev_balanced_questions.json"
    for image_id in {r["image_id"] for r in mm_scorers.load_gqa(gqa)}:
        _image(tmp_path / f"{image_id}.jpg", 0)
    _, items = mm_eval.questions("gqa", mm_eval.Sources(questions=str(gqa), images=str(tmp_path)), limit=2)
    assert items[1].prompt == "What is on the table?\nAnswer the question using a single word or phrase."
    assert items[1].item == str(tmp_path / "n288870.jpg")
    textvqa = FIXTURES / "TextVQA_0.5.1_val.json"
    for image_id in {r["image_id"] for r in mm_scorers.load_textvqa(textvqa)}:
        _image(tmp_path / f"{image_id}.jpg", 0)
    records, items = mm_eval.questions("textvqa", mm_eval.Sources(questions=str(textvqa), images=str(tmp_path)))
    assert items[0].prompt == "what brand is the soda?\nAnswer the question using a single word or phrase."
    assert mm_eval.reference_fields("textvqa", records[0])["answers"][7] == "coke"
    assert mm_eval.scienceqa_prompt("Which?", ["x", "y", "z"], "A hint.") == (
        "Context: A hint.\nWhich?\nA. x\nB. y\nC. z\nAnswer with the option's letter from the given choices directly.")


def test_bad_input_is_named_before_the_model_loads(models, files, tmp_path):
    questions = str(FIXTURES / "vqav2_OpenEnded_mscoco_val2014_questions.json")
    annotations = str(FIXTURES / "vqav2_mscoco_val2014_annotations.json")
    images = str(files["images"])
    cases = [
        ("vqav2", dict(questions=questions, images=images), "needs --annotations=..."),
        ("vqav2", dict(questions=questions, annotations=str(tmp_path / "missing.json"), images=images),
         "--annotations=.*missing.json: no such file"),
        ("vqav2", dict(questions=questions, annotations=annotations, images=images, transcripts=images),
         "does not read --transcripts"),
        ("mmmu", dict(questions=questions), "expected one of vqav2"),
        ("vqav2", dict(questions=questions, annotations=annotations, images=str(tmp_path)),
         "no image 000000262148.jpg"),
        ("pope", dict(questions=annotations, images=images), "line 1: not valid JSON"),
        ("librispeech", dict(transcripts=str(files["librispeech"])), "needs an audio model"),
        ("librispeech", dict(transcripts=str(files["librispeech"]), audio=str(tmp_path)), "no audio file"),
    ]
    for benchmark, sources, message in cases:
        with pytest.raises(mm_eval.InputError, match=message):
            mm_eval.run(str(models["vision"]), benchmark, mm_eval.Sources(**sources), None, log=None)


def test_the_command_prints_an_error_line_and_exits_2(models, files, tmp_path):
    proc, result = _eval([f"--modrwkv={models['vision']}", "--benchmark=vqav2",
                          f"--questions={FIXTURES / 'vqav2_OpenEnded_mscoco_val2014_questions.json'}",
                          f"--images={files['images']}"], tmp_path / "run")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --benchmark=vqav2 needs --annotations=..."), \
        proc.stderr
    assert result is None
    proc, _ = _eval(["--config=configs/eval_math.py:tiny", "--benchmark=pope"], tmp_path / "run")
    assert proc.returncode != 0 and "--benchmark needs --modrwkv" in proc.stderr
