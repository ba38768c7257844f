"""rwkv_jax.data: readers, prepare, the grain pipeline, the feature cache and the synthetic tasks.

References: the chat format and packing of rwkv_jax.multimodal (themselves checked against the reference
code), the encoders' own preprocessing and length rules, soundfile / PIL for the file contents, the DTMF
standard's frequency table, scipy.ndimage for counting shapes.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import soundfile
from PIL import Image
from scipy import ndimage

from rwkv_jax import data
from rwkv_jax import multimodal as mm
from rwkv_jax.encoders import audio as audio_lib
from rwkv_jax.encoders import image as image_lib
from rwkv_jax.encoders import wavlm
from rwkv_jax.tokenizer import world_tokenizer

IMAGE_CFG = image_lib.ImageProcessorConfig(resize_to=(32, 32))
IMAGE_TOKENS = 16  # a 32x32 image with 8x8 patches


def image_config(seq_len: int = 64, **kw) -> data.PrepareConfig:
    return data.PrepareConfig(seq_len=seq_len, image=IMAGE_CFG, image_encoder_tokens=IMAGE_TOKENS, **kw)


def write_png(path, size=(40, 48), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    """A sine that survives PCM-16 exactly (values are multiples of 1/32768)."""
    t = np.arange(int(seconds * data.SAMPLING_RATE)) / data.SAMPLING_RATE
    return np.round(0.3 * np.sin(2 * np.pi * freq * t) * 32768) / 32768


def turns(question: str, answer: str = "fine") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# ------------------------------------------------------------------------------------------- readers


def test_read_llava_json_array_and_jsonl(tmp_path):
    folder = tmp_path / "images"
    array = [
        {"id": "a", "image": "x/1.jpg", "conversations": turns("<image>\nWhat?")},
        {"id": "b", "image": ["2.jpg", "3.jpg"], "conversations": turns("<image><image>Both?")},
        {"id": "c", "conversations": turns("Text only.")},
    ]
    json_file = tmp_path / "chat.json"
    json_file.write_text(json.dumps(array, indent=2))
    records = data.read_llava(json_file, folder)
    assert [r.source for r in records] == [f"{json_file}[{i}]" for i in range(3)]
    assert records[0].images == [str(folder / "x/1.jpg")]
    assert records[1].images == [str(folder / "2.jpg"), str(folder / "3.jpg")]
    assert records[2].images == [] and records[2].audio == []
    assert records[1].conversation == array[1]["conversations"]

    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(json.dumps(array[0]) + "\n\n" + json.dumps(array[2]) + "\n")
    records = data.read_llava(jsonl)
    assert [r.source for r in records] == [f"{jsonl}:1", f"{jsonl}:3"]
    assert records[0].images == [str(tmp_path / "x/1.jpg")]  # default folder: the file's


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"image": "a.jpg"}', "no 'conversations'"),
    ('{"conversations": [{"from": "human"}]}', "turn 0"),
    ('{"image": 3, "conversations": [{"from": "human", "value": "q"}]}', "'image' must be"),
])
def test_read_llava_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversations": turns("ok")}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        data.read_llava(path)


def test_read_audio_manifest_and_librispeech(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "train-clean-100" / "19" / "198"
    chapter.mkdir(parents=True)
    clips = {"19-198-0000": tone(0.25, 300), "19-198-0001": tone(0.4, 500)}
    for name, samples in clips.items():
        soundfile.write(chapter / f"{name}.flac", samples, data.SAMPLING_RATE, subtype="PCM_16")
    listing = chapter / "19-198.trans.txt"
    listing.write_text("19-198-0000 NORTHANGER ABBEY\n19-198-0001 BY JANE AUSTEN\n")
    records = data.read_librispeech(tmp_path / "LibriSpeech")
    assert [r.source for r in records] == [f"{listing}:1", f"{listing}:2"]
    assert records[0].conversation == [{"from": "human", "value": "<audio>\nTranscribe the audio."},
                                       {"from": "gpt", "value": "northanger abbey"}]
    assert records[1].audio == [str(chapter / "19-198-0001.flac")]
    reference_asr = data.read_librispeech(tmp_path, instruction=None, lowercase=False)
    assert reference_asr[1].conversation == [{"from": "gpt", "value": "BY JANE AUSTEN"}]

    # Whisper inputs of the FLAC file: the decoded samples through the Whisper front end, and the frames
    # the reference keeps, attention_mask.sum() // 2 + 1.
    example = data.prepare(records[1], data.PrepareConfig(seq_len=64, audio="whisper"))
    features, mask = audio_lib.whisper_features(clips["19-198-0001"].astype(np.float32))
    np.testing.assert_array_equal(example["audio_inputs"][0], features[0])
    np.testing.assert_array_equal(example["audio_mask"][0], mask[0])
    assert example["audio_frames"][0] == mask[0].sum() // 2 + 1 == 21  # 0.4 s: 40 mel frames
    assert example["audio_slots"][0] == mm.audio_adapter_length(21) == 12
    assert example["modality_mask"].sum() == 12

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "LibriSpeech/train-clean-100/19/198/19-198-0000.flac",
                                    "text": "northanger abbey"}) + "\n")
    (record,) = data.read_audio_manifest(manifest)
    assert record.source == f"{manifest}:1" and record.audio == [str(chapter / "19-198-0000.flac")]
    assert record.conversation == records[0].conversation
    manifest.write_text('{"audio": "x.flac"}\n')
    with pytest.raises(ValueError, match=f"{manifest}:1: .*'text'"):
        data.read_audio_manifest(manifest)


def test_tfds_librispeech_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.TfdsLibriSpeech("train_clean100", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- prepare


def test_prepare_image_record_matches_the_chat_format_and_preprocessing(tmp_path):
    pixels = write_png(tmp_path / "a.png")
    conversation = turns("<image>\nWhat is it?", "Noise.")
    record = data.MultimodalRecord(conversation, [str(tmp_path / "a.png")], [], "t:1")
    example = data.prepare(record, image_config(seq_len=64))
    reference = mm.format_conversation(conversation, [IMAGE_TOKENS], mm.LATER, world_tokenizer())
    tokens, mask, targets = mm.pack_for_training(reference, 64)
    np.testing.assert_array_equal(example["tokens"], tokens)
    np.testing.assert_array_equal(example["modality_mask"], mask)
    np.testing.assert_array_equal(example["targets"], targets)
    assert example["modality_mask"].sum() == IMAGE_TOKENS
    np.testing.assert_array_equal(example["pixel_values"][0], image_lib.preprocess_one(pixels, IMAGE_CFG))
    assert example["image_count"] == 1 and example["image_slots"].tolist() == [IMAGE_TOKENS]

    # Up to max_images items padded with zeros; a text-only record gets none.
    config = image_config(seq_len=96, max_images=2)
    two = data.prepare(data.MultimodalRecord(turns("<image><image>Same?"), [pixels, pixels], [], "t:2"), config)
    assert two["pixel_values"].shape == (2, 3, 32, 32) and two["image_slots"].tolist() == [16, 16]
    assert two["modality_mask"].sum() == 32
    text = data.prepare(data.MultimodalRecord(turns("Hi"), [], [], "t:3"), config)
    assert text["image_count"] == 0 and not text["pixel_values"].any() and not text["modality_mask"].any()


def test_pixel_values_without_pillow_equal_the_processor():
    image = data.shapes_records(1, 0)[0].images[0]
    for cfg in (IMAGE_CFG, image_lib.ImageProcessorConfig(resize_to=(32, 32), image_mean=image_lib._OPENAI_CLIP[0],
                                                          image_std=image_lib._OPENAI_CLIP[1])):
        np.testing.assert_array_equal(data.pixel_values(image, cfg), image_lib.preprocess_one(image, cfg))
    resized = image_lib.ImageProcessorConfig(resize_to=(24, 24))
    assert data.pixel_values(image, resized).shape == (3, 24, 24)


@pytest.mark.parametrize("modality_length, slots", [
    (data.AdapterLengths(compress_images=True), mm.compressed_length(IMAGE_TOKENS)),
    ({"image": 5}, 5),
    (lambda kind, n: n // 4, 4),
])
def test_modality_length_sets_the_slots(modality_length, slots):
    record = data.shapes_records(1, 0)[0]
    example = data.prepare(record, image_config(modality_length=modality_length))
    assert example["image_slots"][0] == example["modality_mask"].sum() == slots


def test_prepare_wavlm_frames_and_padding():
    samples = tone(0.5)
    config = data.PrepareConfig(seq_len=64, audio="wavlm", max_audio_seconds=1.0)
    example = data.prepare(data.MultimodalRecord(data.asr_conversation("hi"), [], [samples], "w:1"), config)
    frames = int(wavlm.output_lengths(wavlm.WavLMEncoderConfig(), np.asarray(samples.size)))
    assert example["audio_frames"][0] == frames == 24
    assert example["audio_slots"][0] == mm.audio_adapter_length(frames)
    values, mask = audio_lib.wavlm_inputs(samples)
    assert example["audio_inputs"].shape == (1, 16000)
    np.testing.assert_array_equal(example["audio_inputs"][0, :samples.size], values[0])
    assert not example["audio_inputs"][0, samples.size:].any()
    assert example["audio_mask"][0].sum() == samples.size


def test_prepare_prepend_layout_and_truncation():
    record = data.MultimodalRecord(data.asr_conversation("one two three", instruction=None), [], [tone(0.3)], "p:1")
    config = data.PrepareConfig(seq_len=64, audio="whisper", chat_format=mm.PAPER_ERA)
    example = data.prepare(record, config)
    slots = int(example["audio_slots"][0])
    assert example["modality_mask"][:slots].all() and not example["modality_mask"][slots:].any()
    # The reference ASR text: `\x16Assistant: {transcript}\x17`, all labelled, right after the audio.
    text = world_tokenizer().encode("\x16Assistant: one two three\x17")
    np.testing.assert_array_equal(example["tokens"][slots:slots + len(text)], text)
    np.testing.assert_array_equal(example["targets"][slots - 1:slots - 1 + len(text)], text)

    long = data.MultimodalRecord(turns("<image>\nDescribe.", "word " * 80), [np.zeros((32, 32, 3), np.uint8)], [],
                                 "p:2")
    with pytest.raises(data.BadRecord, match="p:2: has .* tokens, more than seq_len"):
        data.prepare(long, image_config(seq_len=48))
    cut = data.prepare(long, image_config(seq_len=48, truncate=True))
    assert cut["tokens"].shape == (48,) and cut["modality_mask"].sum() == IMAGE_TOKENS
    full = mm.format_conversation(long.conversation, [IMAGE_TOKENS], mm.LATER, world_tokenizer())
    np.testing.assert_array_equal(cut["tokens"], full.input_ids[:48])  # the first T tokens, the answer cut
    np.testing.assert_array_equal(cut["targets"], full.labels[1:49])
    assert cut["targets"][-1] != mm.IGNORE_INDEX


# ------------------------------------------------------------------------------------------- pipeline


def bad_records_files(tmp_path):
    """A LLaVA JSONL and an audio manifest with good and bad lines; returns (records, {source: kind})."""
    write_png(tmp_path / "good.png", (32, 32))
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "broken.flac").write_bytes(b"fLaC but not really")
    soundfile.write(tmp_path / "good.flac", tone(0.3), data.SAMPLING_RATE, subtype="PCM_16")
    chat = tmp_path / "chat.jsonl"
    lines = [
        {"image": "good.png", "conversations": turns("<image>\nGood?", "yes")},
        {"image": "missing.png", "conversations": turns("<image>\nMissing?")},
        {"image": "broken.png", "conversations": turns("<image>\nBroken?")},
        {"image": "good.png", "conversations": turns("No marker here.")},
        {"image": "good.png", "conversations": turns("<image>\nLong?", "word " * 200)},
        {"conversations": [{"from": "human", "value": "No answer."}]},
        {"conversations": turns("Text only is fine.", "ok")},
    ]
    chat.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text(json.dumps({"audio": "good.flac", "text": "a tone"}) + "\n"
                        + json.dumps({"audio": "broken.flac", "text": "nothing"}) + "\n")
    records = data.read_llava(chat) + data.read_audio_manifest(manifest)
    bad = {f"{chat}:2": "missing_image", f"{chat}:3": "bad_image", f"{chat}:4": "format", f"{chat}:5": "too_long",
           f"{chat}:6": "no_target", f"{manifest}:2": "bad_audio"}
    return records, bad


def test_bad_records_are_counted_logged_once_and_skipped(tmp_path, caplog):
    records, bad = bad_records_files(tmp_path)
    config = image_config(seq_len=128, audio="whisper")
    pipeline = data.MultimodalPipeline(records, config, batch_size=1, seed=0, shard=(0, 1), shuffle=False,
                                       num_epochs=2)
    with caplog.at_level(logging.WARNING, logger="rwkv_jax.data"):
        batches = list(pipeline.iterator())
    assert len(batches) == 2 * (len(records) - len(bad))
    assert pipeline.stats.kept == len(batches)
    assert pipeline.stats.total_rejected == 2 * len(bad)
    expected = {}
    for kind in bad.values():
        expected[kind] = expected.get(kind, 0) + 2
    assert dict(pipeline.stats.rejected) == expected
    assert pipeline.stats.rejected_sources == set(bad)
    messages = [r.getMessage() for r in caplog.records]
    for source, kind in bad.items():
        assert sum(m.startswith(f"skipping {source} ({kind})") for m in messages) == 1, (source, messages)
    assert "12 rejected" in pipeline.stats.summary()
    for source, kind in bad.items():  # prepare itself raises, naming the source
        with pytest.raises(data.BadRecord, match=source) as info:
            data.prepare(next(r for r in records if r.source == source), config)
        assert info.value.kind == kind


def test_a_shard_of_only_bad_records_stops(tmp_path):
    record = data.MultimodalRecord(turns("<image>\nQ?"), [str(tmp_path / "none.png")], [], "x:1")
    pipeline = data.MultimodalPipeline([record] * 3, image_config(), batch_size=1, seed=0, shard=(0, 1))
    with pytest.raises(ValueError, match="every record of this host's shard .3. is rejected"):
        next(pipeline.iterator())


def row_keys(batches) -> list[bytes]:
    """One key per row: the bytes of its pixels (every synthetic image differs)."""
    return [row.tobytes() for b in batches for row in b["pixel_values"]]


def test_pipeline_shards_shuffles_per_epoch_and_is_deterministic():
    records = data.shapes_records(12, 0)
    config = image_config(seq_len=48)
    keys = row_keys([{"pixel_values": data.prepare(r, config)["pixel_values"][None]} for r in records])
    for index in range(3):
        pipeline = data.MultimodalPipeline(records, config, 2, seed=0, shard=(index, 3), shuffle=False, num_epochs=1)
        batches = list(pipeline.iterator())
        assert all(b["tokens"].shape == (2, 48) and b["pixel_values"].shape == (2, 1, 3, 32, 32) for b in batches)
        assert row_keys(batches) == keys[index::3]

    def epochs(seed):
        it = data.MultimodalPipeline(records, config, 4, seed=seed, shard=(0, 1)).iterator()
        rows = row_keys([next(it) for _ in range(6)])
        return rows[:12], rows[12:]

    first, second = epochs(0)
    assert sorted(first) == sorted(second) == sorted(keys)
    assert first != second and first != keys
    assert epochs(0) == (first, second)
    assert epochs(1)[0] != first


def test_iterator_state_round_trip_gives_the_same_continuation(tmp_path):
    records = data.shapes_records(10, 1)
    records.insert(4, data.MultimodalRecord(turns("<image>\nQ?"), [str(tmp_path / "gone.png")], [], "gone:1"))
    config = image_config(seq_len=48)
    pipeline = data.MultimodalPipeline(records, config, 3, seed=7, shard=(0, 1))
    it = pipeline.iterator()
    for _ in range(5):  # past the first epoch (10 good records = 3.3 batches)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    resumed = data.MultimodalPipeline(records, config, 3, seed=7, shard=(0, 1)).iterator(json.loads(json.dumps(state)))
    for want, got in zip(expected, [next(resumed) for _ in range(6)]):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


@pytest.mark.slow
def test_worker_processes_give_the_in_process_batches():
    records = data.shapes_records(16, 2)
    config = image_config(seq_len=48)
    reference = data.MultimodalPipeline(records, config, 4, seed=3, shard=(0, 1)).iterator()
    expected = [next(reference) for _ in range(7)]
    pipeline = data.MultimodalPipeline(records, config, 4, seed=3, shard=(0, 1), num_workers=2)
    it = pipeline.iterator()
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    got += [next(it) for _ in range(4)]
    it.close()
    resumed = pipeline.iterator(state)
    again = [next(resumed) for _ in range(4)]
    resumed.close()
    for want, have in zip(expected + expected[3:], got + again):
        for key in want:
            np.testing.assert_array_equal(want[key], have[key])


# ------------------------------------------------------------------------------------------- feature cache


def test_feature_cache_keys_reads_and_writes(tmp_path):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "siglip", "hidden_size": 8}))
    (encoder / "model.safetensors").write_bytes(b"weights v1")
    image = tmp_path / "a.png"
    write_png(image)
    calls = []

    def encode(items):
        calls.append(len(items))
        return [np.full((4, 8), len(str(item)), np.float32) for item in items]

    identity = data.encoder_identity(encoder)
    cache = data.FeatureCache(tmp_path / "cache", identity, IMAGE_CFG)
    array = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    first = cache.features("image", [image, array], encode)
    second = cache.features("image", [image, array], encode)
    assert calls == [2]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2

    # Anything that changes the features changes the key: the encoder's config or weights, the
    # preprocessing, the modality, the item's content.
    keys = {cache.key("image", image)}
    (encoder / "config.json").write_text(json.dumps({"model_type": "siglip", "hidden_size": 16}))
    keys.add(data.FeatureCache(tmp_path / "cache", data.encoder_identity(encoder), IMAGE_CFG).key("image", image))
    (encoder / "model.safetensors").write_bytes(b"weights v2 longer")
    keys.add(data.FeatureCache(tmp_path / "cache", data.encoder_identity(encoder), IMAGE_CFG).key("image", image))
    other = image_lib.ImageProcessorConfig(resize_to=(64, 64))
    keys.add(data.FeatureCache(tmp_path / "cache", identity, other).key("image", image))
    keys.add(cache.key("audio", image))
    write_png(image, seed=1)
    keys.add(cache.key("image", image))
    assert len(keys) == 6
    assert cache.get("image", image) is None  # the changed file is a miss
    assert data.encoder_identity(encoder, {"a": 1}) != data.encoder_identity(encoder, {"a": 2})

    stored = cache.path(cache.key("image", array))
    stored.write_bytes(b"corrupt")
    assert cache.get("image", array) is None
    cache.features("image", [array], encode)
    assert calls == [2, 1]


def test_fill_then_prepare_reads_the_cache_and_still_screens_items(tmp_path):
    """fill_feature_cache encodes each item once (padded batches); prepare then gives the cached features in
    place of the pixels, rejects a missing file as before, and refuses an item the cache lacks."""
    for i in range(3):
        write_png(tmp_path / f"{i}.png", seed=i)
    records = [data.MultimodalRecord(turns("<image>\nWhat?"), [tmp_path / f"{i}.png"], [], f"r{i}") for i in range(3)]
    records.append(data.MultimodalRecord(turns("<image>\nWhat?"), [tmp_path / "gone.png"], [], "list.json:4"))
    records.append(data.MultimodalRecord(turns("<image>\nAgain?"), [tmp_path / "0.png"], [], "r0 again"))
    calls = []

    def encode(kind, inputs, mask):  # a stand-in encoder: [n, 3, 32, 32] -> [n, 16, 4], row sums
        calls.append((kind, inputs.shape, mask))
        return np.broadcast_to(inputs.sum(axis=(1, 2, 3))[:, None, None], (len(inputs), 16, 4)).astype(np.float32)

    config = image_config(tokenizer=_Chars())
    cache = data.FeatureCache(tmp_path / "cache", "enc", config.preprocessing(), (16, 4))
    stats = data.fill_feature_cache(records, config, cache, encode, batch_size=2, shard=(0, 1), progress=None)
    assert (stats.encoded, stats.bad, stats.cached) == (3, 1, 0)
    assert [c[1] for c in calls] == [(2, 3, 32, 32), (2, 3, 32, 32)] and calls[0][2] is None  # padded to 2 rows
    assert data.fill_feature_cache(records, config, cache, encode, 2, shard=(0, 1), progress=None).cached == 3
    with_cache = dataclasses.replace(config, features=cache)
    example = data.prepare(records[1], with_cache)
    assert "pixel_values" not in example and example["image_features"].shape == (1, 16, 4)
    want = data.prepare(records[1], config)["pixel_values"][0].sum()
    np.testing.assert_allclose(example["image_features"][0, 0, 0], want, rtol=1e-6)
    np.testing.assert_array_equal(example["modality_mask"], data.prepare(records[1], config)["modality_mask"])
    with pytest.raises(data.BadRecord, match="gone.png does not exist"):
        data.prepare(records[3], with_cache)
    write_png(tmp_path / "new.png", seed=9)
    fresh = data.MultimodalRecord(turns("<image>\nWhat?"), [tmp_path / "new.png"], [], "new.json:1")
    with pytest.raises(data.FeatureCacheMiss, match="new.json:1: its image is not in the feature cache"):
        data.prepare(fresh, with_cache)
    # bfloat16 features round-trip through their bits
    import ml_dtypes
    bf16 = data.FeatureCache(tmp_path / "bf16", "enc", {}, (2, 2), ml_dtypes.bfloat16)
    value = np.asarray([[1.5, -2.25], [3.0, 1e-3]], ml_dtypes.bfloat16)
    bf16.put("image", np.zeros(3, np.uint8), value)
    got = bf16.get("image", np.zeros(3, np.uint8))
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got.view(np.uint16), value.view(np.uint16))


class _Chars:
    """One id per character."""

    def encode(self, text):
        return [ord(ch) % 250 + 1 for ch in text]


# ------------------------------------------------------------------------------------------- synthetic tasks


def test_shapes_records_are_deterministic_and_balanced():
    a, b, c = data.shapes_records(48, 5), data.shapes_records(48, 5), data.shapes_records(48, 6)
    assert all(np.array_equal(x.images[0], y.images[0]) and x.conversation == y.conversation for x, y in zip(a, b))
    assert any(not np.array_equal(x.images[0], y.images[0]) for x, y in zip(a, c))
    assert all(r.images[0].dtype == np.uint8 and r.images[0].shape == (32, 32, 3) for r in a)
    assert data.shapes_records(4, 0, size=64)[0].images[0].shape == (64, 64, 3)
    records = data.shapes_records(240, 0)
    by_question: dict[str, list[str]] = {}
    for record in records:
        assert record.conversation[0]["value"].startswith("<image>\n")
        question, answer = data.question_and_answer(record)
        by_question.setdefault(question, []).append(answer)
    assert len(by_question) == 4
    for question, answers in by_question.items():
        counts = np.unique(answers, return_counts=True)[1]
        assert len(counts) >= 3 and counts.max() - counts.min() <= 1, (question, counts)
        assert not {"yes", "no"} & set(answers)


def test_blind_prior_is_at_most_a_third():
    train, heldout = data.shapes_records(400, 0), data.shapes_records(400, 1)
    assert data.blind_prior_accuracy(heldout, train) <= 0.35
    assert data.blind_prior_accuracy(heldout) <= 0.35  # even fitted on the held-out answers themselves
    # The measure itself: a question whose answer is always the same is answered perfectly.
    fixed = [data.MultimodalRecord(turns("<image>\nQ?", "red"), [], [], "")] * 3
    assert data.blind_prior_accuracy(fixed) == 1.0


def foreground(image: np.ndarray) -> np.ndarray:
    """Pixels far from the (near-uniform) background colour: the shapes."""
    background = np.median(image.reshape(-1, 3), axis=0)
    return np.abs(image.astype(float) - background).sum(-1) > 90


@pytest.mark.parametrize("size", [32, 64])
def test_shape_images_show_their_answer(size):
    for record in data.shapes_records(160, 3, size):
        question, answer = data.question_and_answer(record)
        image = record.images[0]
        shapes = foreground(image)
        labels, count = ndimage.label(shapes)
        if question == data.QUESTIONS["count"]:
            assert count == data.COUNTS.index(answer) + 1, record.source
            continue
        assert count == 1, record.source
        ys, xs = np.nonzero(shapes)
        if question == data.QUESTIONS["colour"]:
            mean = image[shapes].astype(float).mean(0)
            nearest = min(data.COLOURS, key=lambda c: np.abs(mean - data.COLOURS[c]).sum())
            assert nearest == answer, (record.source, mean)
        elif question == data.QUESTIONS["position"]:
            third = int((xs.mean() + 0.5) // (size / 3))
            assert data.POSITIONS[third] == answer, record.source
        else:  # fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2
            fill = shapes.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[answer]
            assert abs(fill - expected) < 0.13, (record.source, answer, fill)


def test_dtmf_tones_have_the_standard_frequency_pairs():
    rng = np.random.default_rng(0)
    samples, spans = data.dtmf_signal("15900", rng)
    assert samples.dtype == np.float32 and len(spans) == 5
    for digit, (start, end) in zip("15900", spans):
        segment = samples[start:end]
        spectrum = np.abs(np.fft.rfft(segment * np.hanning(segment.size), n=data.SAMPLING_RATE))  # 1 Hz bins
        spectrum[:400] = 0
        peaks = []
        for _ in range(2):
            peak = int(np.argmax(spectrum))
            peaks.append(peak)
            spectrum[max(peak - 40, 0):peak + 40] = 0
        low, high = sorted(peaks)
        # ITU-T Q.23: rows 697/770/852/941 Hz, columns 1209/1336/1477 Hz.
        expected = {"1": (697, 1209), "5": (770, 1336), "9": (852, 1477), "0": (941, 1336)}[digit]
        assert abs(low - expected[0]) <= 3 and abs(high - expected[1]) <= 3, (digit, low, high)
        assert np.abs(samples[end:end + 200]).max() < 0.15  # a gap follows each tone


def test_dtmf_records_and_manifest(tmp_path):
    records = data.dtmf_records(20, 4)
    again = data.dtmf_records(20, 4)
    assert all(np.array_equal(a.audio[0], b.audio[0]) and a.conversation == b.conversation
               for a, b in zip(records, again))
    assert any(not np.array_equal(a.audio[0], b.audio[0]) for a, b in zip(records, data.dtmf_records(20, 5)))
    lengths = set()
    for record in records:
        words = record.conversation[-1]["value"].split()
        assert 3 <= len(words) <= 6 and set(words) <= set(data.DIGIT_WORDS)
        lengths.add(len(words))
    assert len(lengths) >= 3
    assert data.digit_words("407") == "four zero seven"

    manifest = data.write_dtmf_manifest(tmp_path, 3, 4)
    read = data.read_audio_manifest(manifest)
    assert [r.conversation for r in read] == [r.conversation for r in records[:3]]
    samples, rate = soundfile.read(read[0].audio[0], dtype="float32")
    assert rate == data.SAMPLING_RATE
    np.testing.assert_allclose(samples, records[0].audio[0], atol=0.5 / 32768 + 1e-7)
    np.testing.assert_allclose(data.load_audio(read[0].audio[0]), samples)
    config = data.PrepareConfig(seq_len=64, audio="whisper")
    from_file, in_memory = data.prepare(read[0], config), data.prepare(records[0], config)
    np.testing.assert_array_equal(from_file["tokens"], in_memory["tokens"])
    np.testing.assert_allclose(from_file["audio_inputs"], in_memory["audio_inputs"], atol=0.05)


def test_resampled_audio_keeps_its_pitch(tmp_path):
    rate = 44100
    t = np.arange(rate // 2) / rate
    soundfile.write(tmp_path / "a.wav", 0.3 * np.sin(2 * np.pi * 1000 * t), rate, subtype="PCM_16")
    samples = data.load_audio(tmp_path / "a.wav")
    assert samples.size == data.SAMPLING_RATE // 2
    assert np.argmax(np.abs(np.fft.rfft(samples, n=data.SAMPLING_RATE))) == 1000


def test_without_the_optional_packages(tmp_path, monkeypatch):
    """No Pillow: in-memory images at the encoder's size still work, a file is a clear ImportError (not a
    skipped record). No soundfile: 16-bit WAV still reads."""
    manifest = data.write_dtmf_manifest(tmp_path, 1, 0)
    (record,) = data.read_audio_manifest(manifest)
    expected = data.load_audio(record.audio[0])
    write_png(tmp_path / "a.png", (32, 32))
    monkeypatch.setattr(image_lib, "Image", None)
    monkeypatch.setattr(audio_lib, "soundfile", None)
    np.testing.assert_array_equal(data.load_audio(record.audio[0]), expected)
    synthetic = data.prepare(data.shapes_records(1, 0)[0], image_config())
    assert synthetic["image_count"] == 1
    with pytest.raises(ImportError, match="multimodal"):
        data.prepare(data.MultimodalRecord(turns("<image>\nQ?"), [str(tmp_path / "a.png")], [], "f:1"), image_config())
