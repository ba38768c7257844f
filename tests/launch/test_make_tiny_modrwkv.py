"""launch/make_tiny_modrwkv.py: the encoder's attribute labels, the language model's text and tokenizer, an
end-to-end build, and the committed assets/tiny-modrwkv (real formats; what the embedded defaults need)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxrl_peft.models import family
from rwkv_jax import data, modrwkv
from rwkv_jax import multimodal as mm
from rwkv_jax.encoders import image as image_lib
from rwkv_jax.encoders import vit

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets" / "tiny-modrwkv"


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_modrwkv", ROOT / "launch" / "make_tiny_modrwkv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attribute_labels_describe_the_images(tmp_path):
    """Each label read back from the pixels: the shape's colour (nearest palette colour of its pixels), the
    third its pixels' centre lies in, the number of blobs of a count scene."""
    script = _script()
    vit.save_preprocessor(tmp_path, script.IMAGE_SIZE)
    attributes = script.attribute_data(96, 0, image_lib.processor_config(tmp_path))
    pixels = attributes.inputs["pixel_values"] * 0.5 + 0.5  # back to [0, 1]: [N, 3, 32, 32]
    palette = np.asarray(list(data.COLOURS.values())) / 255
    for i in range(96):
        shape_mask = np.abs(pixels[i] - np.median(pixels[i], axis=(1, 2), keepdims=True)).max(0) > 0.2  # [32, 32]
        labels = {k: int(v[i]) for k, v in attributes.labels.items()}
        if labels["count"] >= 0:
            assert ndimage.label(shape_mask)[1] == labels["count"] + 1
            assert labels["colour"] == labels["shape"] == labels["position"] == -1
            continue
        assert labels["count"] == -1 and min(labels["colour"], labels["shape"], labels["position"]) >= 0
        colour = pixels[i][:, shape_mask].mean(1)
        assert np.argmin(((palette - colour) ** 2).sum(1)) == labels["colour"]
        assert int((np.nonzero(shape_mask)[1].mean() + 0.5) * 3 // script.IMAGE_SIZE) == labels["position"]  # centres
    counts = {k: int((v >= 0).sum()) for k, v in attributes.labels.items()}
    assert counts == {"colour": 72, "shape": 72, "position": 72, "count": 24}


def test_text_is_the_paper_format_with_uniform_answers():
    script = _script()
    pairs = script.text_examples(4000, 0)
    qa, asr = pairs[0::2], pairs[1::2]
    assert all(p.startswith("\x16User: ") and p.endswith("\x17") and c.startswith("\x16Assistant: ")
               and c.endswith("\x17") for p, c in qa)
    assert all(p == "\x16" and c.startswith("Assistant: ") and c.endswith("\x17") for p, c in asr)
    by_question: dict[str, list[str]] = {}
    for p, c in qa:
        by_question.setdefault(p, []).append(c[len("\x16Assistant: "):-1])
    assert len(by_question) == 8  # 4 questions, with and without the literal '<image>\n'
    for question, answers in by_question.items():
        kind = next(k for k, q in data.QUESTIONS.items() if question.endswith(q + "\x17"))
        counts = [answers.count(a) for a in data.ANSWERS[kind]]
        assert sum(counts) == len(answers) > 150 and max(counts) - min(counts) <= 1  # equally often
    lengths = [len(c.removeprefix("Assistant: ").removesuffix("\x17").split()) for _, c in asr]
    assert set(lengths) == {3, 4, 5, 6}
    assert all(w in data.DIGIT_WORDS for _, c in asr for w in c[len("Assistant: "):-1].split())
    assert script.text_examples(50, 0) == pairs[:50] and script.text_examples(50, 1) != pairs[:50]


def test_tokenizer_keeps_the_turn_markers_whole(tmp_path):
    script = _script()
    pairs = script.text_examples(400, 0)
    tok = script.build_tokenizer(tmp_path, [p + c for p, c in pairs], 300)
    assert [tok.encode(t) for t in ("<pad>", "\x16", "\x17")] == [[0], [1], [2]]
    assert tok.eos_id == 2 and tok.pad_id == 0 and tok.vocab_size <= 300
    text = "\x16User: red?\x17\x16Assistant: one\x17"
    ids = tok.encode(text)
    assert ids.count(1) == 2 and ids.count(2) == 2 and tok.decode(ids) == text
    examples = script.tokenize(pairs, tok)
    assert all(c[-1] == 2 for _, c in examples)
    assert [p + c for p, c in examples] == [tok.encode(p + c) for p, c in pairs]  # a turn splits at its prompt


@pytest.mark.slow  # about 90 s: compiles both training runs, the distributions, ModRWKV and its sampler
def test_builds_loadable_parts(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "make_tiny_modrwkv.py"), f"--out={out}", "--encoder_images=64",
         "--probe_images=16", "--encoder_steps=2", "--encoder_batch=8", "--encoder_hidden=16",
         "--text_examples=200", "--heldout_text=8", "--lm_steps=2", "--lm_batch=4", "--lm_hidden=32",
         "--vocab_size=300", "--heldout_records=8"],
        check=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.stdout.strip().splitlines()[-1].startswith("heldout_accuracy before=")
    assert json.loads((out / "siglip" / "config.json").read_text())["hidden_size"] == 16
    fam, _ = family.load(str(out / "rwkv7"))
    assert fam.config.n_embd == 32 and fam.tokenizer().vocab_size <= 300


# ------------------------------------------------------------------------------------------- the assets

@pytest.fixture(scope="module")
def assets():
    if not (ASSETS / "siglip" / "model.safetensors").exists():
        pytest.skip("assets/tiny-modrwkv is not built")
    return ASSETS


def test_asset_encoder_is_a_real_siglip_checkpoint(assets):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.SiglipVisionModel.from_pretrained(assets / "siglip").eval()
    processor = transformers.SiglipImageProcessorPil.from_pretrained(assets / "siglip")
    images = [r.images[0] for r in data.shapes_records(4, 7)]
    pixels = processor(images, return_tensors="np")["pixel_values"]
    ours = image_lib.preprocess(images, image_lib.processor_config(assets / "siglip"))
    assert np.abs(pixels - ours).max() <= 1e-6
    encoder, params = vit.load_from_config(assets / "siglip", json.loads((assets / "siglip/config.json").read_text()))
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert ref.shape == (4, 16, 64)
    assert np.abs(np.asarray(encoder.apply({"params": params}, ours)) - ref).max() <= 1e-4


def test_asset_language_model_answers_from_the_answer_set_uniformly(assets):
    fam, params = family.load(str(assets / "rwkv7"))
    tok = fam.tokenizer()
    assert tok.encode(mm.TURN_END) == [tok.eos_id] and len(tok.encode(mm.TURN_START)) == 1
    for kind, question in data.QUESTIONS.items():
        prompt = tok.encode(mm.PAPER_ERA.user(question))
        rows = [prompt + tok.encode(mm.PAPER_ERA.assistant(a)) for a in data.ANSWERS[kind]]
        width = 32  # one shape for every question: one compilation
        tokens = np.asarray([r + [tok.pad_id] * (width - len(r)) for r in rows], np.int32)
        logp = np.asarray(fam.token_logprobs({"params": params}, jnp.asarray(tokens))[0])
        p = np.exp([logp[i, len(prompt) - 1:len(r) - 1].sum() for i, r in enumerate(rows)])
        assert p.sum() > 0.9, (kind, p)  # the answer turns take nearly all the mass
        assert np.abs(p / p.sum() - 1 / len(p)).max() < 0.12, (kind, p)  # and no answer is favoured much


def test_asset_modrwkv_answers_from_the_prior_before_training(assets):
    fam, params = modrwkv.from_parts(assets / "siglip", assets / "rwkv7", chat_format="paper")
    records = data.shapes_records(48, 1)
    answers = _script().greedy_answers(fam, params, records, strip_marker=False, batch=48)
    kinds = [_script().kind_of(r) for r in records]
    assert all(a in data.ANSWERS[k] for a, k in zip(answers, kinds)), answers
    truth = [data.question_and_answer(r)[1] for r in records]
    assert np.mean([a == t for a, t in zip(answers, truth)]) <= 0.45
