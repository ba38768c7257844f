"""Builds assets/tiny-modrwkv/, the small real-format models the ModRWKV embedded defaults start from.

  python launch/make_tiny_modrwkv.py            # writes assets/tiny-modrwkv/{siglip,rwkv7}

siglip/: a tiny SigLIP vision tower as an HF checkpoint (config.json 'siglip_vision_model',
model.safetensors, preprocessor_config.json of a SiglipImageProcessor) that stands for a pretrained
encoder: 32x32 images, patch 8 (16 tokens), hidden 64, 2 layers, 4 heads. It is pretrained on the
shapes images' attributes through the training core (`rwkv_jax.pretrain.AttributeTask`, full
fine-tuning): linear heads read colour / shape / position / count from every one of its 16 output
tokens, so any token tells what the image holds.

rwkv7/: a tiny RWKV-7 language model (official safetensors + config.json as `rwkv_jax.model.save` writes
them, and HF tokenizer files) pretrained on text only through the supervised task (jaxrl_peft/train/sft.py):
the shapes questions in the ModRWKV paper chat format without their images (`\\x16User: {q}\\x17` then
`\\x16Assistant: {a}\\x17`, every answer of each question's answer set equally often, so it learns the format
and the answer vocabulary but cannot know the right answer; half the questions carry the literal
'<image>\\n' that the paper-era records keep) and ASR-style turns `\\x16Assistant: {digit words}\\x17` of 3-6
random digits for the audio default. Its byte-level BPE tokenizer has '<pad>' (id 0, the id the paper
layout stores at modality slots), '\\x16' and '\\x17' (the end of turn, its eos) as special tokens, so each
is always one token.

Last, ModRWKV is built from the two parts (`modrwkv.from_parts(siglip, rwkv7, chat_format='paper')`, the
connector untrained), a `Chat` answers a question about an image, and the "before" figure of the vision
default is measured: exact-match accuracy of greedy answers on held-out shapes records.

The encoder's scenes are drawn with `data.shape_scene` from seeds 1000 (pretraining) and 1001 (probe); the
"before" figure uses `shapes_records(200, seed=1)` (the held-out seed a ModRWKV config should use too).
Deterministic for a given --seed on a given machine.

Measured (2 CPU cores shared with other jobs, load ~4.5; 4.5 min in all), the committed assets (2.31 MB):
- encoder: 0.113M parameters, 1,000 steps of 256 scenes (40,000 scenes, lr 3e-3 cosine; 135 s). Held-out
  accuracy of the heads reading each token alone (2,000 probe scenes): colour 1.000, shape 0.941,
  position 0.999, count 0.858 (mean 0.950, 0.320 at init).
- language model: 0.457M parameters (2 layers, hidden 128, 4 heads x 32, ffn 384, vocab 381), 400 steps of
  32 conversations (16,000, lr 3e-3 cosine; 85 s). Held-out loss per completion token 5.953 -> 1.041; the
  text's entropy floor is 1.037 (only the answer and the digits are uncertain). Its answer distribution,
  normalised over the answer set (the set takes 0.98-0.99 of the mass), for the questions without the
  marker (with it: within 0.002): colour red .297 green .220 blue .224 yellow .259; shape circle .382
  square .330 triangle .288; position left .294 middle .378 right .329; count one .337 two .330 three .333;
  first digit of an ASR turn .086-.111 each.
- ModRWKV from the parts, connector untrained: greedy answers are all in the answer set; exact-match
  accuracy on the 200 held-out records 0.310 with the questions as the records hold them ('<image>\n'
  first), 0.260 without the marker (the best image-blind answer scores 0.320). Chat: 'What colour is the
  shape?' -> ' red' (the image shows green). Answers start with the space of `\x16Assistant: {a}`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from configs import sft as sft_configs
from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import family, hf
from jaxrl_peft.peft import registry
from jaxrl_peft.rl import rollout
from jaxrl_peft.train import loop, sft
from rwkv_jax import data, modrwkv, pretrain
from rwkv_jax import model as rwkv_model
from rwkv_jax import multimodal as mm
from rwkv_jax.encoders import image as image_lib
from rwkv_jax.encoders import vit

IMAGE_SIZE = 32
ENCODER_SEEDS = (1000, 1001)  # of the encoder's pretraining and probe scenes (`attribute_data`)
HELDOUT_SEED = 1  # shapes_records seed of the held-out QA records ("before" figure)
TEXT_SEEDS = (0, 1)  # training and held-out text
PAD, TURN_START, TURN_END = "<pad>", mm.TURN_START, mm.TURN_END
SPECIAL_TOKENS = (PAD, TURN_START, TURN_END)  # ids 0, 1, 2
FORMAT = mm.PAPER_ERA
KINDS = tuple(data.QUESTIONS)
SCENE_KINDS = ("colour", "shape", "position", "count")  # of the encoder's pretraining scenes


# ------------------------------------------------------------------------------------------------
# The encoder


def kind_of(record: data.MultimodalRecord) -> str:
    """The question kind of a shapes record."""
    question = data.question_and_answer(record)[0]
    return next(k for k, q in data.QUESTIONS.items() if q == question)


def encoder_config(args: argparse.Namespace) -> vit.VisionConfig:
    """The tower: 32x32 images, SigLIP's 4x MLP and activation."""
    return vit.VisionConfig(arch="siglip", hidden_size=args.encoder_hidden, intermediate_size=4 * args.encoder_hidden,
                            num_layers=args.encoder_layers, num_heads=args.encoder_heads, image_size=IMAGE_SIZE,
                            patch_size=args.patch_size)


def attribute_data(count: int, seed: int, processor: image_lib.ImageProcessorConfig) -> pretrain.AttributeData:
    """Pixel values of `count` shapes scenes (answers uniform) and their labels: colour, shape and position
    (the third its centre is in) of the one shape of a colour / shape / position scene; the count of a count
    scene (its only label: its shapes differ). The scene kinds take turns (SCENE_KINDS)."""
    rng = np.random.default_rng([seed, 0xA77])
    pixels = np.zeros((count, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    labels = {kind: np.full(count, -1, np.int32) for kind in KINDS}
    for i in range(count):
        kind = SCENE_KINDS[i % len(SCENE_KINDS)]
        answer = data.ANSWERS[kind][int(rng.integers(len(data.ANSWERS[kind])))]
        drawn: list[dict] = []
        pixels[i] = data.pixel_values(data.shape_scene(kind, answer, rng, IMAGE_SIZE, drawn), processor)
        if kind == "count":
            labels["count"][i] = len(drawn) - 1
            continue
        (item,) = drawn
        labels["colour"][i] = list(data.COLOURS).index(item["colour"])
        labels["shape"][i] = data.SHAPES.index(item["shape"])
        labels["position"][i] = min(int(item["x"] * 3 // IMAGE_SIZE), 2)
        if labels[kind][i] != data.ANSWERS[kind].index(answer):
            raise RuntimeError(f"scene {i}: its {kind} label disagrees with the answer it was drawn for")
    return pretrain.AttributeData({"pixel_values": pixels}, labels)


def pretrain_encoder(out: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Pretrains the tower on the images' attributes and writes it (and its preprocessing) to `out`;
    returns the held-out accuracy of each attribute."""
    cfg = encoder_config(args)
    vit.save_preprocessor(out, IMAGE_SIZE)
    processor = image_lib.processor_config(out)
    train = attribute_data(args.encoder_images, ENCODER_SEEDS[0], processor)
    heldout = attribute_data(args.probe_images, ENCODER_SEEDS[1], processor)
    c = pretrain.config(seed=args.seed, steps=args.encoder_steps, checkpoint_every=args.encoder_steps,
                        log_every=max(1, args.encoder_steps // 10))
    c.pretrain.update(batch_size=args.encoder_batch, micro_batch_size=args.encoder_batch,
                     pooling=args.encoder_pooling)
    c.optim.update(learning_rate=args.encoder_lr, warmup_steps=min(50, args.encoder_steps // 10))
    c.mesh.update(data=1, fsdp=1, tensor=1)
    key = jax.random.fold_in(jax.random.key(args.seed), 1)
    params = pretrain.scratch_init(vit.init_params(cfg, key), key)
    task = pretrain.AttributeTask(c, vit.VisionEncoder(cfg), params, {k: len(data.ANSWERS[k]) for k in KINDS},
                                  ("pixel_values",), train, heldout)
    print(f"encoder: SigLIP {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
          f"{cfg.num_patches} tokens, {_count(params) / 1e6:.3f}M parameters; {len(train)} images")
    run = loop.train(task, c, work / "encoder", mesh=_one_device())
    accuracies = task.accuracies(run.frozen, run.state.adapter)
    vit.save_hf(out, cfg, pretrain.trained_encoder(run))
    return accuracies


# ------------------------------------------------------------------------------------------------
# The language model's text


def qa_example(kind: str, answer: str, marker: bool) -> tuple[str, str]:
    """(user turn, assistant turn) of a shapes question, as the paper format writes them."""
    question = data.QUESTIONS[kind]
    return FORMAT.user(f"{data.IMAGE_MARKER}\n{question}" if marker else question), FORMAT.assistant(answer)


def asr_example(digits: str) -> tuple[str, str]:
    """The reference's ASR turn (no user turn: the audio precedes it): the turn start is the prompt."""
    turn = FORMAT.assistant(data.digit_words(digits))
    return turn[:1], turn[1:]


def text_examples(count: int, seed: int) -> list[tuple[str, str]]:
    """`count` (prompt, completion) texts, alternating: shapes QA turns (random question, with or without the
    marker) and ASR digit turns. Each question's answers come in shuffled blocks of its whole answer set, so
    every answer is equally frequent (to within one) and the blind prior is uniform."""
    rng = np.random.default_rng([seed, 0x7E47])
    blocks: dict[tuple[str, bool], list[str]] = {}
    out = []
    for i in range(count):
        if i % 2 == 0:
            kind, marker = KINDS[int(rng.integers(len(KINDS)))], bool(rng.integers(2))
            block = blocks.setdefault((kind, marker), [])
            if not block:
                block.extend(str(a) for a in rng.permutation(data.ANSWERS[kind]))
            out.append(qa_example(kind, block.pop(), marker))
        else:
            out.append(asr_example("".join(str(d) for d in rng.integers(0, 10, int(rng.integers(3, 7))))))
    return out


def build_tokenizer(path: Path, texts: list[str], vocab_size: int) -> hf.Tokenizer:
    """A byte-level BPE trained on `texts` with '<pad>', '\\x16', '\\x17' as special tokens (ids 0, 1, 2):
    tokenizer.json and tokenizer_config.json (eos '\\x17', pad '<pad>')."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": TURN_END,
              "pad_token": PAD, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    out = hf.Tokenizer(path)
    for i, token in enumerate(SPECIAL_TOKENS):
        if out.encode(token) != [i]:
            raise RuntimeError(f"tokenizer: {token!r} is not the single token {i}: {out.encode(token)}")
    return out


def tokenize(pairs: list[tuple[str, str]], tok: hf.Tokenizer) -> list[sft.Example]:
    """Token pairs; each turn is tokenised on its own (as mm.format_conversation does), and a whole turn's
    tokens must equal its two halves' (the special tokens cut the text)."""
    out = []
    for prompt, completion in pairs:
        p, c = tok.encode(prompt), tok.encode(completion)
        if not prompt.endswith(TURN_END) and tok.encode(prompt + completion) != p + c:
            raise RuntimeError(f"tokenizer: {prompt + completion!r} does not split at the prompt")
        out.append((p, c))
    return out


def lm_sft_config(work: Path, args: argparse.Namespace, seq_len: int) -> ml_collections.ConfigDict:
    """Full training of every weight from a random init, as make_tiny_model.py trains tiny-rwkv7."""
    c = sft_configs.get_config("tiny")
    c.seed = args.seed
    c.model.update(checkpoint=str(work), remat=False)
    c.peft = ml_collections.ConfigDict(dict(name="full", hparams=ml_collections.ConfigDict()))
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.sft.update(batch_size=args.lm_batch, micro_batch_size=args.lm_batch, seq_len=seq_len)
    c.optim.update(learning_rate=args.lm_lr, schedule="cosine", warmup_steps=min(50, args.lm_steps // 10),
                   end_learning_rate=0.0, weight_decay=0.01, decay="matrices", b1=0.9, b2=0.98, eps=1e-8,
                   grad_clip=1.0)
    c.data.update(train="", heldout="")
    c.steps, c.eval_every, c.checkpoint_every = args.lm_steps, 0, args.lm_steps
    c.log_every = max(1, args.lm_steps // 10)
    return c


def train_lm(out: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Builds the tokenizer, trains the RWKV-7 on text and writes it to `out`; returns its held-out losses."""
    train_pairs = text_examples(args.text_examples, TEXT_SEEDS[0])
    heldout_pairs = text_examples(args.heldout_text, TEXT_SEEDS[1])
    tok = build_tokenizer(work, [p + c for p, c in train_pairs], args.vocab_size)
    examples, heldout = tokenize(train_pairs, tok), tokenize(heldout_pairs, tok)
    seq_len = -(-max(len(p) + len(c) for p, c in examples + heldout) // 16) * 16
    config = rwkv_model.RWKV7Config(vocab_size=tok.vocab_size, n_embd=args.lm_hidden, n_layer=args.lm_layers,
                                    head_size=32, dim_ffn=3 * args.lm_hidden, decay_lora=16, iclr_lora=16,
                                    value_lora=8, gate_lora=16)
    params = nn.unbox(rwkv_model.RWKV7(config).init(jax.random.fold_in(jax.random.key(args.seed), 2),
                                                    jnp.zeros((1, 1), jnp.int32))["params"])
    rwkv_model.save(str(work), config, params)  # the random init, which the supervised task loads and trains
    print(f"language model: RWKV-7 {config.n_layer} layers, hidden {config.n_embd}, {config.n_head} heads x "
          f"{config.head_size}, vocab {tok.vocab_size}, {_count(params) / 1e6:.3f}M parameters; "
          f"{len(examples)} examples of <= {seq_len} tokens")
    c = lm_sft_config(work, args, seq_len)
    run = loop.train(sft.SFTTask(c, examples, heldout=heldout), c, work / "run", mesh=_one_device())
    rwkv_model.save(str(out), config, registry.merge(run.method, run.frozen["base"], run.state.adapter))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / name, out / name)
    return {"before": run.results["heldout_loss_before"], "after": run.results["heldout_loss_after"],
            "seq_len": seq_len}


def continuation_logprobs(lm: tuple, prompt: str, continuations: list[str]) -> np.ndarray:
    """log p(continuation | prompt) under the language model `lm` (family, params), each continuation's
    tokens summed."""
    fam, params = lm
    tok = fam.tokenizer()
    p = tok.encode(prompt)
    rows = [p + tok.encode(c) for c in continuations]
    tokens = np.full((len(rows), max(map(len, rows))), tok.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    logp = np.asarray(fam.token_logprobs({"params": params}, jnp.asarray(tokens))[0])  # [B, T-1]
    return np.asarray([logp[i, len(p) - 1:len(r) - 1].sum() for i, r in enumerate(rows)])


def answer_distributions(path: Path) -> dict[str, dict[str, float]]:
    """Per question (without and with the '<image>' marker): the probability of each whole answer turn,
    normalised over the answer set, and the mass the set gets ('total'); and of each first digit word of
    an ASR turn."""
    lm = family.load(str(path))
    out = {}
    for kind in KINDS:
        for marker in (False, True):
            answers = data.ANSWERS[kind]
            p = np.exp(continuation_logprobs(lm, qa_example(kind, "", marker)[0],
                                             [FORMAT.assistant(a) for a in answers]))
            out[kind + ("+marker" if marker else "")] = {**dict(zip(answers, _rounded(p / p.sum()))),
                                                         "total": round(float(p.sum()), 3)}
    p = np.exp(continuation_logprobs(lm, TURN_START, [f"Assistant: {w}" for w in data.DIGIT_WORDS]))
    out["asr first digit"] = {**dict(zip(data.DIGIT_WORDS, _rounded(p / p.sum()))), "total": round(float(p.sum()), 3)}
    return out


# ------------------------------------------------------------------------------------------------
# ModRWKV from the two parts


def greedy_answers(family: modrwkv.ModRWKVFamily, params: dict, records: list[data.MultimodalRecord],
                   strip_marker: bool, batch: int = 50) -> list[str]:
    """Greedy answers of a ModRWKV to each record's question about its image, in batches."""
    tok = family.tokenizer()
    slots = vit.config_from_hf(family.config.encoder_hf).num_tokens
    sampler = rollout.Sampler(family, rollout.SamplingConfig(max_new_tokens=8, temperature=0.0), pad_id=tok.pad_id,
                              stop_tokens=family.stop_ids(tok))
    variables = {"params": params}
    embed = jax.jit(lambda v, t, x, m: family.module.apply(v, t, x, m, method=modrwkv.ModRWKV.prompt_embeddings))
    answers = []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        prompts = []
        for record in chunk:
            user = next(t["value"] for t in record.conversation if t["from"] in mm.USER_ROLES)
            question = data.question_and_answer(record)[0] if strip_marker else user
            example = mm.generation_prompt(question, [slots], family.config.format, tok)
            prompts.append((example.input_ids.tolist(), example.modality_mask.tolist()))
        tokens, mask = rollout.left_pad([p for p, _ in prompts], tok.pad_id)
        slot_mask = np.zeros_like(mask)
        for i, (_, m) in enumerate(prompts):
            slot_mask[i, mask.shape[1] - len(m):] = m
        pixels = family.preprocess([r.images[0] for r in chunk])["inputs"][:, None]  # [B, 1, 3, H, W]
        embeddings = embed(variables, jnp.asarray(tokens), jnp.asarray(pixels), jnp.asarray(slot_mask))
        out = sampler(variables, tokens, mask, jax.random.key(0), embeddings=embeddings)
        answers += [a.strip() for a in rollout.decode_completions(tok, jax.device_get(out))]
    return answers


def check_modrwkv(siglip: Path, rwkv7: Path, count: int) -> dict[str, object]:
    """Builds ModRWKV from the parts (connector untrained), chats once, and measures exact-match accuracy of
    greedy answers on `count` held-out shapes records (the questions as the records hold them, with the
    '<image>' marker, and without it)."""
    family, params = modrwkv.from_parts(siglip, rwkv7, chat_format="paper")
    records = data.shapes_records(count, HELDOUT_SEED, IMAGE_SIZE)
    chat = modrwkv.Chat(family, {"params": params}, rollout.SamplingConfig(max_new_tokens=8, temperature=0.0))
    question, answer = data.question_and_answer(records[0])
    reply = chat.ask(question, [records[0].images[0]])
    print(f"chat: {question!r} -> {reply!r} (the image's answer: {answer!r})")
    result: dict[str, object] = {"chat": reply, "blind_prior": data.blind_prior_accuracy(records)}
    truth = [data.question_and_answer(r)[1] for r in records]
    for strip in (False, True):
        answers = greedy_answers(family, params, records, strip)
        name = "plain" if strip else "marker"
        result[f"accuracy_{name}"] = float(np.mean([a == t for a, t in zip(answers, truth)]))
        result[f"valid_{name}"] = float(np.mean([a in data.ANSWERS[kind_of(r)] for a, r in zip(answers, records)]))
    return result


def _rounded(x: np.ndarray) -> list[float]:
    return np.round(np.asarray(x, np.float64), 3).tolist()


def _count(params: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _one_device() -> jax.sharding.Mesh:
    return mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])  # tiny models: no sharding


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/tiny-modrwkv", help="directory to write (its parts overwritten)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--encoder_hidden", type=int, default=64)
    parser.add_argument("--encoder_layers", type=int, default=2)
    parser.add_argument("--encoder_heads", type=int, default=4)
    parser.add_argument("--encoder_images", type=int, default=40000)
    parser.add_argument("--probe_images", type=int, default=2000)
    parser.add_argument("--encoder_steps", type=int, default=1000)
    parser.add_argument("--encoder_batch", type=int, default=256)
    parser.add_argument("--encoder_lr", type=float, default=3e-3)
    parser.add_argument("--encoder_pooling", default="tokens", choices=pretrain.POOLING,
                        help="the attribute heads read each token ('tokens') or their mean ('mean')")
    parser.add_argument("--vocab_size", type=int, default=384)
    parser.add_argument("--lm_hidden", type=int, default=128)
    parser.add_argument("--lm_layers", type=int, default=2)
    parser.add_argument("--text_examples", type=int, default=16000)
    parser.add_argument("--heldout_text", type=int, default=512)
    parser.add_argument("--lm_steps", type=int, default=400)
    parser.add_argument("--lm_batch", type=int, default=32)
    parser.add_argument("--lm_lr", type=float, default=3e-3)
    parser.add_argument("--heldout_records", type=int, default=200)
    parser.add_argument("--parts", default="siglip,rwkv7,check", help="which steps to run (the others' outputs "
                        "are read from --out)")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"siglip", "rwkv7", "check"}:
        parser.error(f"--parts: unknown {sorted(parts - {'siglip', 'rwkv7', 'check'})}")

    t0 = time.perf_counter()
    out = Path(args.out)
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "siglip" in parts:
            t = time.perf_counter()
            shutil.rmtree(out / "siglip", ignore_errors=True)
            figures["probe"] = pretrain_encoder(out / "siglip", work, args)
            print(f"encoder pretrained in {time.perf_counter() - t:.0f}s; held-out attribute accuracy "
                  + " ".join(f"{k} {v:.3f}" for k, v in figures["probe"].items()))
        if "rwkv7" in parts:
            t = time.perf_counter()
            shutil.rmtree(out / "rwkv7", ignore_errors=True)
            (out / "rwkv7").mkdir(parents=True)
            figures["lm"] = train_lm(out / "rwkv7", work / "lm", args)
            print(f"language model trained in {time.perf_counter() - t:.0f}s; held-out text loss "
                  f"{figures['lm']['before']:.3f} -> {figures['lm']['after']:.3f}")
            for question, dist in answer_distributions(out / "rwkv7").items():
                print(f"  answers to {question}: {dist}")
    if "check" in parts:
        figures["check"] = check_modrwkv(out / "siglip", out / "rwkv7", args.heldout_records)
        print(f"untrained connector on {args.heldout_records} held-out records: {figures['check']}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f}s")
    if "check" in parts:
        print(f"heldout_accuracy before={figures['check']['accuracy_marker']:.3f}")


if __name__ == "__main__":
    main()
