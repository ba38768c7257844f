"""ModRWKV supervised training as a task on the one training core, and the two-stage driver.

Stage 1 trains the connector (adapter, compressor); stage 2 the connector and the language model, fully
or with any PEFT method (`peft.name='parts'` gives each top-level part its own method). Data: LLaVA
conversations, audio manifests, LibriSpeech, or the synthetic tasks of the embedded defaults
(`rwkv_jax.data`), through the grain pipeline with its checkpointable position. Evaluation generates
answers in RNN mode through the shared sampler (`generate_answers`) and scores them: exact match for QA,
word error rate for ASR, or the held-out loss.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrl_peft.eval import mm_scorers
from jaxrl_peft.infra import checkpoint as ckpt_lib, mesh as mesh_lib
from jaxrl_peft.models import hub
from jaxrl_peft.models.layers import chunked_token_logprobs
from jaxrl_peft.peft import registry
from jaxrl_peft.rl import rollout
from jaxrl_peft.train import loop
from rwkv_jax import data, modrwkv, multimodal as mm
from rwkv_jax.encoders import audio as audio_lib, image as image_lib

Array = jax.Array
METRICS = {"qa": "heldout_accuracy", "asr": "heldout_wer", "loss": "heldout_loss"}
FORMATS = ("llava", "audio_manifest", "librispeech", "synthetic_shapes", "synthetic_dtmf")


def read_records(c: ml_collections.ConfigDict, role: str) -> list[data.MultimodalRecord]:
    """config.data.<role> ('train' or 'heldout') as records, by config.data.format."""
    d = c.data
    spec = d.get(role, "")
    if not spec:
        return []
    if d.format == "synthetic_shapes":
        count = d.synthetic_size if role == "train" else d.heldout_size
        return data.shapes_records(count, d.synthetic_seed + (0 if role == "train" else 1_000_003), d.image_size)
    if d.format == "synthetic_dtmf":
        count = d.synthetic_size if role == "train" else d.heldout_size
        return data.dtmf_records(count, d.synthetic_seed + (0 if role == "train" else 1_000_003),
                                 instruction=d.instruction or None)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"config data.{role}={spec!r}: no such file or directory")
    if d.format == "llava":
        return data.read_llava(spec, d.image_folder or None)
    if d.format == "audio_manifest":
        return data.read_audio_manifest(spec, d.audio_folder or None, instruction=d.instruction or None)
    if d.format == "librispeech":
        return data.read_librispeech(spec, instruction=d.instruction or None)
    raise loop.ConfigError(f"config data.format={d.format!r}: expected one of {FORMATS}")


def prepare_config(family: modrwkv.ModRWKVFamily, tokenizer: Any, c: ml_collections.ConfigDict) -> data.PrepareConfig:
    """How records become this model's inputs: its preprocessing, chat format and slot counts."""
    cfg = family.config
    kw: dict[str, Any] = dict(seq_len=c.data.seq_len, tokenizer=tokenizer, chat_format=cfg.format,
                              truncate=bool(c.data.get("truncate", False)))
    if cfg.modality == "vision":
        kw.update(image=image_lib.processor_config(cfg.preprocessor or {}),
                  image_encoder_tokens=family.module.encoder.cfg.num_tokens,
                  modality_length=data.AdapterLengths(compress_images=cfg.compress))
    else:
        kw.update(audio=cfg.encoder_kind, n_mels=cfg.encoder_hf.get("num_mel_bins", 80),
                  max_audio_seconds=c.data.max_audio_seconds)
        if cfg.encoder_kind == "whisper":  # the checkpoint's window (a tiny Whisper-style encoder: 4 s)
            kw["whisper_chunk_seconds"] = audio_lib.whisper_chunk_seconds(
                cfg.preprocessor, cfg.encoder_hf["max_source_positions"])
    return data.PrepareConfig(**kw)


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows `ModRWKV` takes, from a pipeline batch (pixel_values, audio_* or cached *_features fields)."""
    rows = {"tokens": batch["tokens"], "targets": batch["targets"], "modality_mask": batch["modality_mask"]}
    if "image_features" in batch:
        rows["features"] = batch["image_features"]
    elif "audio_features" in batch:
        rows["features"], rows["feature_lengths"] = batch["audio_features"], batch["audio_frames"]
    elif "pixel_values" in batch:
        rows["inputs"] = batch["pixel_values"]
    else:
        rows["inputs"], rows["attention_mask"] = batch["audio_inputs"], batch["audio_mask"]
    count = batch["image_count"] if "image_count" in batch else batch["audio_count"]
    items = (rows["features"] if "features" in rows else rows["inputs"]).shape[1]
    rows["item_mask"] = np.arange(items)[None, :] < np.asarray(count)[:, None]
    return rows


class ModRWKVTask:
    """One stage of ModRWKV's supervised training on the training core."""

    name = "modrwkv"
    progress_keys = ("loss", "grad_norm")
    updates_per_batch = 1

    def __init__(self, c: ml_collections.ConfigDict, records: Sequence[data.MultimodalRecord] | None = None,
                 heldout: Sequence[data.MultimodalRecord] | None = None):
        t = c.train
        if t.batch_size < 1 or t.micro_batch_size < 1 or t.batch_size % t.micro_batch_size:
            raise loop.ConfigError(f"config train.batch_size={t.batch_size} must be a positive multiple of "
                                   f"train.micro_batch_size={t.micro_batch_size}")
        if t.batch_size % jax.process_count():
            raise loop.ConfigError(f"config train.batch_size={t.batch_size} must divide over {jax.process_count()} hosts")
        if c.eval.metric not in METRICS:
            raise loop.ConfigError(f"config eval.metric={c.eval.metric!r}: expected one of {sorted(METRICS)}")
        self.c = c
        self.eval_metric = METRICS[c.eval.metric]
        self.micro_batch_size = t.micro_batch_size
        self.data_files = {role: str(c.data.get(role, "")) for role in ("train", "heldout")}
        self._records, self._heldout = records, heldout
        self.shuffle_eval = False  # evaluate with the items shuffled across examples (the proof that it looks)

    def build_model(self, mesh: jax.sharding.Mesh | None) -> tuple[modrwkv.ModRWKVFamily, Any]:
        m = self.c.model
        dtype, compute = jnp.dtype(m.param_dtype), jnp.dtype(m.dtype)
        if m.init:
            return modrwkv.load(m.init, dtype=dtype, compute_dtype=compute, mesh=mesh)
        encoder, llm = hub.resolve_model(m.encoder, kind="encoder").path, hub.resolve_model(m.rwkv).path
        self.data_files.update(encoder=str(encoder), rwkv=str(llm))
        return modrwkv.from_parts(encoder, llm, compress=m.compress, adapter_ratio=m.adapter_ratio,
                                  chat_format=m.chat_format or None, seed=self.c.seed, dtype=dtype,
                                  compute_dtype=compute, mesh=mesh)

    def setup(self, mesh: jax.sharding.Mesh) -> loop.Setup:
        c = self.c
        self.mesh = mesh
        base, params = self.build_model(mesh)
        self.base_family = base
        self.method = registry.from_config(c.peft).prepare(params)
        self.family = base.with_peft(self.method, remat=c.model.remat)
        self.tokenizer = self.family.tokenizer()
        self.prepare = prepare_config(self.family, self.tokenizer, c)
        records = list(self._records if self._records is not None else read_records(c, "train"))
        if not records:
            raise loop.ConfigError("config data.train names no training records")
        if c.data.get("feature_cache", ""):
            self.prepare = dataclasses.replace(self.prepare, features=self.fill_feature_cache(params, records))
        self.heldout = list(self._heldout if self._heldout is not None else read_records(c, "heldout"))
        self.pipeline = data.MultimodalPipeline(records, self.prepare, c.train.batch_size // jax.process_count(),
                                                c.seed, num_workers=c.data.num_workers)
        self.iterator = self.pipeline.iterator()
        self.sampler = eval_sampler(self.family, self.tokenizer, c)
        return loop.Setup(params, self.family.param_axes(), self.method)

    def fill_feature_cache(self, params: Any, records: Sequence[data.MultimodalRecord]) -> data.FeatureCache:
        """config.data.feature_cache (a directory) keyed by the encoder's weights and the preprocessing, with
        every item of this host's records in it: the frozen encoder runs once per item, not once per epoch."""
        c = self.c
        adapter = jax.eval_shape(lambda p: registry.init_adapter(self.method, jax.random.key(0), p)[1], params)
        if jax.tree.leaves(adapter.get("encoder", {})):
            raise loop.ConfigError("config data.feature_cache needs a frozen encoder, but this stage's PEFT method "
                                   f"trains parameters under 'encoder/' ({_trained_parts(c.peft)}); "
                                   "set data.feature_cache='' for it")
        module, encoder_params = self.base_family.module, params["encoder"]
        fn = jax.jit(lambda p, x, m: module.apply({"params": {"encoder": p}}, x, m,
                                                  method=modrwkv.ModRWKV.encoder_features)[0])
        example = jax.eval_shape(fn, encoder_params, *self._example_item())
        cache = data.FeatureCache(c.data.feature_cache, data.params_identity(encoder_params),
                                  self.prepare.preprocessing(), example.shape[1:], example.dtype)
        encode = lambda kind, x, m: np.asarray(fn(encoder_params, x, m))  # noqa: E731
        data.fill_feature_cache(records, self.prepare, cache, encode, c.train.micro_batch_size,
                                progress=lambda line: print(line, flush=True) if jax.process_index() == 0 else None)
        return cache

    def _example_item(self) -> tuple[Any, Any]:
        """One item's encoder input and mask (None for images), batched, as the pipeline makes them."""
        p = self.prepare
        if p.image is not None:
            return jax.ShapeDtypeStruct((1, 3, *data.image_shape(p.image)), jnp.float32), None
        width = ((p.n_mels, audio_lib.whisper_mel_frames(p.whisper_chunk_seconds)) if p.audio == "whisper"
                 else (p.audio_samples(),))
        return jax.ShapeDtypeStruct((1, *width), jnp.float32), jax.ShapeDtypeStruct((1, width[-1]), jnp.int32)

    # ------------------------------------------------------------------ batches
    def data_state(self) -> Any:
        """The pipeline's position and its counts so far (a resumed run reports the same counts)."""
        stats = self.pipeline.stats
        return {"iterator": self.iterator.get_state(), "kept": stats.kept, "rejected": dict(stats.rejected)}

    def restore_data_state(self, state: Any) -> None:
        self.iterator = self.pipeline.iterator(state["iterator"])
        self.pipeline.stats.kept = int(state["kept"])
        self.pipeline.stats.rejected = collections.Counter({k: int(v) for k, v in state["rejected"].items()})

    def next_batch(self, step: int, frozen: Any, adapter: Any
                   ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
        del step, frozen, adapter
        rows = model_inputs(next(self.iterator))
        tokens = float(mesh_lib.gather_hosts((rows["targets"] != mm.IGNORE_INDEX).sum()).sum())
        return rows, {"tokens": tokens}, {"rejected_records": float(self.pipeline.stats.total_rejected)}

    # ------------------------------------------------------------------ the loss
    def nll(self, variables: dict, batch: dict[str, Array]) -> tuple[Array, Array]:
        """(summed NLL of the target tokens, their count) of a batch of rows."""
        module = self.family.module
        hidden = module.apply(variables, batch["tokens"], batch.get("inputs"), batch["modality_mask"],
                              attention_mask=batch.get("attention_mask"), item_mask=batch["item_mask"],
                              features=batch.get("features"), feature_lengths=batch.get("feature_lengths"),
                              return_hidden=True)[0]
        targets = batch["targets"]
        head = lambda h: module.apply(variables, h, method=modrwkv.ModRWKV.logits_from_hidden)  # noqa: E731
        logp = chunked_token_logprobs(hidden, jnp.maximum(targets, 0), head)[0]
        weights = (targets != mm.IGNORE_INDEX).astype(jnp.float32)
        return -jnp.sum(logp * weights), jnp.sum(weights)

    def pre_update(self, frozen: Any, adapter: Any, batch: dict[str, Array]) -> dict[str, Array]:
        return {}

    def loss(self, frozen: Any, adapter: Any, batch: dict[str, Array], totals: dict[str, Array]
             ) -> tuple[Array, dict[str, Array]]:
        nll, count = self.nll(self.method.model_variables(frozen["base"], adapter), batch)
        return nll / jnp.maximum(totals["tokens"], 1.0), {"weight": count}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, frozen: Any, adapter: Any) -> float:
        """Exact-match accuracy (qa), word error rate (asr) or mean NLL per target token (loss) on the
        held-out records (0 when there are none)."""
        records = self.heldout[:self.c.eval.examples]
        if not records:
            return 0.0
        variables = self.method.model_variables(frozen["base"], adapter)
        if self.c.eval.metric == "loss":
            return heldout_loss(self, variables, records)
        answers = generate_answers(self.family, variables, records, self.sampler, self.tokenizer,
                                   self.c.eval.batch_size, shuffle_seed=self.c.seed if self.shuffle_eval else None)
        return score(self.c.eval.metric, records, answers)

    def close(self) -> None:
        pass


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def score(metric: str, records: Sequence[data.MultimodalRecord], answers: Sequence[str]) -> float:
    """Exact match (qa, case and spacing folded) or word error rate (asr) of generated answers."""
    references = [data.question_and_answer(r)[1] for r in records]
    if metric == "asr":
        return mm_scorers.word_error_rate(references, list(answers), normalize=True)
    return float(np.mean([_normalize(a) == _normalize(r) for a, r in zip(answers, references)]))


def heldout_loss(task: ModRWKVTask, variables: dict, records: Sequence[data.MultimodalRecord]) -> float:
    """Mean NLL per target token of `records` (one pass, in order)."""
    pipeline = data.MultimodalPipeline(records, task.prepare, task.c.eval.batch_size, seed=0, shard=(0, 1),
                                       num_epochs=1, shuffle=False, drop_remainder=False)
    nll_fn = jax.jit(task.nll)
    total = count = 0.0
    for batch in pipeline.iterator():
        nll, n = nll_fn(variables, {k: jnp.asarray(v) for k, v in model_inputs(batch).items()})
        total, count = total + float(nll), count + float(n)
    return total / max(count, 1.0)


_ENCODE_FNS: dict[int, tuple[Any, Any, Any]] = {}


def _encode_fns(module: modrwkv.ModRWKV) -> tuple[Any, Any]:
    """The jitted slot-count and prompt-embedding functions of `module`, compiled once per module."""
    if id(module) not in _ENCODE_FNS:
        lengths = jax.jit(lambda v, x, a: module.apply(v, x, a, method=modrwkv.ModRWKV.encode)[1])
        embed = jax.jit(lambda v, t, x, m, a: module.apply(v, t, x, m, a, method=modrwkv.ModRWKV.prompt_embeddings))
        _ENCODE_FNS[id(module)] = (module, lengths, embed)  # the module is kept: its id stays its own
    return _ENCODE_FNS[id(module)][1:]


def generate_answers(family: modrwkv.ModRWKVFamily, variables: dict, records: Sequence[data.MultimodalRecord],
                     sampler: rollout.Sampler, tokenizer: Any, batch_size: int,
                     shuffle_seed: int | None = None) -> list[str]:
    """The model's answer to each record's first user turn (with its image or clip), decoded in RNN mode:
    the prompt `\\x16User: {q}\\x17\\x16Assistant:` with the item's slots, encoded once and prefilled in
    parallel. `shuffle_seed`: the items are permuted across records first (an image-blind control)."""
    items = [(r.images or r.audio)[0] for r in records]
    if any(len(r.images or r.audio) != 1 for r in records):
        raise ValueError("generate_answers: every record needs exactly one image or audio clip")
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(items))
        items = [items[i] for i in order]
    fmt = family.config.format
    lengths_fn, embed_fn = _encode_fns(family.module)
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        inputs = family.preprocess(items[start:start + len(chunk)])
        x = jnp.asarray(inputs["inputs"])[:, None]
        a = inputs.get("attention_mask")
        a = None if a is None else jnp.asarray(a)[:, None]
        counts = np.asarray(lengths_fn(variables, x, a))
        prompts = []
        for record, slots in zip(chunk, counts):
            question = next(t["value"] for t in record.conversation if t["from"].lower() in mm.USER_ROLES) \
                if any(t["from"].lower() in mm.USER_ROLES for t in record.conversation) else ""
            if not question and fmt.layout == "prepend":  # the reference's ASR prompt: the audio, then the header
                header = tokenizer.encode(f"{mm.TURN_START}Assistant:")
                prompts.append((np.asarray([mm.PREPEND_SLOT_ID] * int(slots) + header, np.int32),
                                np.asarray([True] * int(slots) + [False] * len(header))))
                continue
            marker = data.AUDIO_MARKER if family.config.modality == "audio" else data.IMAGE_MARKER
            example = mm.generation_prompt(question, [int(slots)], dataclasses.replace(fmt, marker=marker), tokenizer)
            prompts.append((example.input_ids, example.modality_mask))
        tokens, valid = rollout.left_pad([p for p, _ in prompts], 0)
        slot_mask = np.zeros_like(valid)
        for row, (ids, mask) in enumerate(prompts):
            slot_mask[row, tokens.shape[1] - len(ids):] = mask
        embeddings = embed_fn(variables, jnp.asarray(tokens), x, jnp.asarray(slot_mask), a)
        out = jax.device_get(sampler(variables, tokens, valid, jax.random.key(0), embeddings=embeddings))
        answers += rollout.decode_completions(tokenizer, out, len(chunk))
    return answers


# ------------------------------------------------------------------------------------------------
# The two-stage driver

def stage_config(c: ml_collections.ConfigDict, stage: str, init: str | None) -> ml_collections.ConfigDict:
    """The single-stage run of `stage` (its peft, optim and steps over the shared fields)."""
    s = c.copy_and_resolve_references()
    s.unlock()
    block = c[stage]
    s.peft = block.peft
    s.optim = block.optim
    s.steps = block.steps
    s.train = ml_collections.ConfigDict({**c.train.to_dict(), **block.get("train", {})})
    if init is not None:
        s.model.init = init
    return s


def train_stages(c: ml_collections.ConfigDict, workdir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                 records: Sequence[data.MultimodalRecord] | None = None,
                 heldout: Sequence[data.MultimodalRecord] | None = None) -> dict[str, float]:
    """Runs config.stages in order, each in workdir/<stage> (each resumable); a finished stage's merged
    model is saved to workdir/<stage>/model and the next stage starts from it. Prints the last line
    `<metric> before=<x> after=<y>` (QA adds `shuffled=<z>`: the final model with the images shuffled)."""
    workdir = ckpt_lib.workdir_path(workdir)
    record_file = workdir / "results.json"
    results = json.loads(record_file.read_text()) if record_file.exists() else {}
    init = None
    for stage in c.stages:
        s = stage_config(c, stage, init)
        if s.data.get("feature_cache", "") and not os.path.isabs(s.data.feature_cache):
            s.data.feature_cache = str(workdir / s.data.feature_cache)  # one cache for every stage of the run
        model_dir = workdir / stage / "model"
        if (model_dir / modrwkv.CONFIG_FILE).exists():
            print(f"{stage}: done earlier ({model_dir})", flush=True)
        else:
            print(f"--- {stage}: {s.peft.name} on {', '.join(_trained_parts(s.peft))}, {s.steps} steps", flush=True)
            task = ModRWKVTask(s, records, heldout)
            run = loop.train(task, s, workdir / stage, mesh)
            results.setdefault("before", run.results[f"{task.eval_metric}_before"])
            results["after"] = run.results[f"{task.eval_metric}_after"]
            merged = registry.merge(run.method, run.frozen["base"], run.state.adapter)
            if jax.process_index() == 0:
                modrwkv.save(model_dir, task.base_family, jax.device_get(merged))
                record_file.write_text(json.dumps(results))
        init = str(model_dir)
    metric = METRICS[c.eval.metric]
    line = f"{metric} before={results['before']:.3f} after={results['after']:.3f}"
    if c.eval.metric == "qa":
        family, params = modrwkv.load(init, dtype=jnp.dtype(c.model.param_dtype), compute_dtype=jnp.dtype(c.model.dtype))
        tokenizer = family.tokenizer()
        heldout = list(heldout if heldout is not None else read_records(c, "heldout"))[:c.eval.examples]
        answers = generate_answers(family, {"params": params}, heldout, eval_sampler(family, tokenizer, c), tokenizer,
                                   c.eval.batch_size, shuffle_seed=c.seed)
        results["shuffled"] = score("qa", heldout, answers)
        line += f" shuffled={results['shuffled']:.3f}"
    print(line, flush=True)
    return results


def eval_sampler(family: modrwkv.ModRWKVFamily, tokenizer: Any, c: ml_collections.ConfigDict) -> rollout.Sampler:
    """The greedy sampler evaluation generates with (the reference evaluates at temperature 0)."""
    sampling = rollout.SamplingConfig(max_new_tokens=c.eval.max_new_tokens, temperature=0.0)
    return rollout.Sampler(family, sampling, pad_id=getattr(tokenizer, "pad_id", 0) or 0,
                           stop_tokens=family.stop_ids(tokenizer))


def _trained_parts(peft: ml_collections.ConfigDict) -> list[str]:
    if peft.name == "parts":
        return sorted(peft.hparams.parts.keys())
    return [str(t) for t in peft.hparams.get("target_modules", ("*",))]
