"""ModRWKV's connectors, chat format, splicing and reference-checkpoint layouts.

Follows the reference code (JL-er/WorldRWKV; Joluck/WorldRWKV for the newest layout), which has two
generations. Paper era (commit f15e179, May 2025): one modality item per sample, its adapter output
prepended to the text embeddings, turns `\\x16User: {q}\\x17` / `\\x16Assistant: {a}\\x17`, vision adapter
hidden 2C, checkpoint keys `modality.world_encoder.{model,adapter}.*`. Later code (Jul-Sep 2025): Qwen-VL
placeholders (`<|vision_start|>` + n x `<|image_pad|>` + `<|vision_end|>`, ids 65530/65532/65531) with the
features written into the pad slots, no space after the colon, adapter hidden 4C and an optional Conv1d
compressor, checkpoint keys `llm.*` / `proj.*` / `encoder.model.*`. `LATER` is the default format,
`PAPER_ERA` the paper's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.models.layers import Conv1D, LayerNorm, Linear, conv_kernel, conv_weight
from jaxrl_peft.peft.base import PeftMethod
from rwkv_jax.tokenizer import WorldTokenizer, world_tokenizer

Dtype = Any
Params = dict[str, Any]

# -------------------------------------------------------------------------------------------------
# Connectors


class VisionCompressor(nn.Module):
    """Conv1d(D -> D, kernel 3, stride 2, no padding, no bias) along the token axis: 576 tokens -> 287.

    The later reference code's `use_conv` option (world/projector/test.py); applied before the adapter.
    """

    kernel_size: int = 3
    stride: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """features [B, L, D] -> [B, (L - kernel_size) // stride + 1, D]."""
        return Conv1D(features.shape[-1], (None, None), False, kernel_size=self.kernel_size, stride=self.stride,
                      dtype=self.dtype, param_dtype=self.param_dtype, peft=self.peft, name="conv")(features)


class VisionAdapter(nn.Module):
    """h = Linear(D, H) -> ReLU -> Linear(H, C); out = h + LayerNorm(h) (reference `VisualAdapter`).

    H = hidden_ratio * C: 4 in the later code (the default), 2 in the paper-era code.
    """

    lm_dim: int
    hidden_ratio: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """features [B, L, D] -> [B, L, lm_dim]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, peft=self.peft)
        hidden = Linear(self.hidden_ratio * self.lm_dim, (None, "mlp"), True, name="fc1", **kw)(features)
        h = Linear(self.lm_dim, ("mlp", "embed"), True, name="fc2", **kw)(jax.nn.relu(hidden))
        return h + LayerNorm(1e-5, name="pre_norm", **kw)(h)


class AudioAdapter(nn.Module):
    """Conv1d(D, H, kernel 3, stride 2, padding 2) -> Linear(H, H) -> ReLU -> Linear(H, C), H = 2C.

    The reference `SpeechAdapter` (speech_encoder.py, whisper_encoder.py): no LayerNorm; 50 Hz -> ~25 Hz.
    """

    lm_dim: int
    hidden_ratio: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """features [B, L, D] -> [B, audio_adapter_length(L), lm_dim]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, peft=self.peft)
        hidden = self.hidden_ratio * self.lm_dim
        x = Conv1D(hidden, (None, "mlp"), True, kernel_size=AUDIO_CONV_KERNEL, stride=2, padding=2, name="conv",
                   **kw)(features)
        x = jax.nn.relu(Linear(hidden, ("mlp", None), True, name="fc1", **kw)(x))
        return Linear(self.lm_dim, (None, "embed"), True, name="fc2", **kw)(x)


AUDIO_CONV_KERNEL = 3
# The WavLM path of the reference drops a sample whose adapter output is longer than this.
MAX_AUDIO_TOKENS = 1023


def conv_output_length(length: int, kernel_size: int, stride: int, padding: int = 0) -> int:
    """Tokens out of a Conv1d over `length` positions: floor((L + 2p - k) / s) + 1."""
    return (length + 2 * padding - kernel_size) // stride + 1


def compressed_length(length: int) -> int:
    """Tokens out of `VisionCompressor`: 576 -> 287, 577 -> 288."""
    return conv_output_length(length, 3, 2)


def audio_adapter_length(length: int) -> int:
    """Tokens out of `AudioAdapter` for `length` encoder frames: floor((L + 1) / 2) + 1."""
    return conv_output_length(length, AUDIO_CONV_KERNEL, 2, 2)


# -------------------------------------------------------------------------------------------------
# Chat format

TURN_START = "\x16"  # World-vocab token 23
TURN_END = "\x17"  # World-vocab token 24: the model's end of turn (inference stops on it)
TURN_END_ID = 24
VISION_START_ID = 65530  # <|vision_start|> in the reference's extended vocab (infer/rwkv/wr_vocab_v20230424.txt)
VISION_END_ID = 65531  # <|vision_end|>
IMAGE_PAD_ID = 65532  # <|image_pad|>: one per modality token
SPECIAL_TOKENS = {"<|vision_start|>": VISION_START_ID, "<|vision_end|>": VISION_END_ID,
                  "<|image_pad|>": IMAGE_PAD_ID}
PREPEND_SLOT_ID = 0  # id stored at prepended modality slots (their embedding is replaced)
IGNORE_INDEX = -100
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How a conversation becomes tokens.

    layout: 'placeholder' (later code: modality slots inside the user turn, at each `marker`) or
    'prepend' (paper era: every modality item's slots before the text; `marker` stays literal text).
    space_after_colon: `\\x16User: q` (paper era) or `\\x16User:q` (later `process_vision_text`).
    """

    layout: str = "placeholder"
    space_after_colon: bool = False
    marker: str = "<image>"

    def __post_init__(self):
        if self.layout not in ("placeholder", "prepend"):
            raise ValueError(f"ChatFormat.layout must be 'placeholder' or 'prepend', got {self.layout!r}")

    def user(self, text: str) -> str:
        return f"{TURN_START}User:{' ' if self.space_after_colon else ''}{text}{TURN_END}"

    def assistant(self, text: str) -> str:
        return f"{TURN_START}Assistant:{' ' if self.space_after_colon else ''}{text}{TURN_END}"


LATER = ChatFormat("placeholder", space_after_colon=False)
PAPER_ERA = ChatFormat("prepend", space_after_colon=True)


@dataclasses.dataclass(frozen=True)
class MultimodalExample:
    """One tokenised conversation; every array has the sequence length T.

    input_ids: token ids; modality slots hold IMAGE_PAD_ID (placeholder) or PREPEND_SLOT_ID (prepend).
    modality_mask: True at the slots whose embedding is a modality token.
    labels: the token a position is trained to be (its own id) or IGNORE_INDEX; not shifted
        (`pack_for_training` makes next-token targets).
    modality_lengths: slots per modality item, in the order their features fill the slots.
    """

    input_ids: np.ndarray  # [T] int32
    modality_mask: np.ndarray  # [T] bool
    labels: np.ndarray  # [T] int32
    modality_lengths: tuple[int, ...]


def prepend_markers(conversation: Sequence[Mapping[str, str]], count: int,
                    marker: str = "<image>") -> list[dict[str, str]]:
    """Puts `count` markers before the first user turn, as the later reference dataset does."""
    turns = [dict(turn) for turn in conversation]
    for turn in turns:
        if turn.get("from", "").lower() in USER_ROLES:
            turn["value"] = marker * count + turn.get("value", "")
            return turns
    raise ValueError("prepend_markers: the conversation has no user turn ('from': 'human' or 'user')")


def _encode_segments(text: str, marker: str, lengths: Sequence[int],
                     tokenizer: WorldTokenizer) -> tuple[list[int], list[bool]]:
    """Tokens of `text` with each marker replaced by vision_start, n pads, vision_end; and the slot mask."""
    parts = text.split(marker)
    ids: list[int] = []
    mask: list[bool] = []
    for i, part in enumerate(parts):
        piece = tokenizer.encode(part)
        ids += piece
        mask += [False] * len(piece)
        if i < len(parts) - 1:
            ids += [VISION_START_ID] + [IMAGE_PAD_ID] * lengths[i] + [VISION_END_ID]
            mask += [False] + [True] * lengths[i] + [False]
    return ids, mask


def format_conversation(conversation: Sequence[Mapping[str, str]], modality_lengths: Sequence[int] = (),
                        chat_format: ChatFormat = LATER,
                        tokenizer: WorldTokenizer | None = None) -> MultimodalExample:
    """Tokens, slot mask and labels of a LLaVA-style conversation ([{'from': 'human'|'gpt', 'value': ...}]).

    Each turn is tokenised on its own and the pieces concatenated, as the reference does. User turns
    get no labels; an assistant turn is labelled whole, `\\x16Assistant:` header and closing `\\x17`
    included. `modality_lengths[i]` is the number of tokens item i gives after its adapter; with the
    placeholder layout the user turns must hold exactly one marker per item. The text on each side of
    a marker is tokenised on its own; the reference's extended-vocab trie gives the same ids unless a
    vocab token spans the text and the special token (a space before the marker: ' <' is a token), where
    the reference itself loses the vision_start token.
    """
    tokenizer = tokenizer or world_tokenizer()
    lengths = [int(n) for n in modality_lengths]
    if any(n < 1 for n in lengths):
        raise ValueError(f"format_conversation: modality_lengths must be positive, got {lengths}")
    ids: list[int] = []
    mask: list[bool] = []
    labels: list[int] = []
    if chat_format.layout == "prepend":
        slots = sum(lengths)
        ids, mask, labels = [PREPEND_SLOT_ID] * slots, [True] * slots, [IGNORE_INDEX] * slots
    else:
        markers = sum(turn.get("value", "").count(chat_format.marker) for turn in conversation
                      if turn.get("from", "").lower() in USER_ROLES)
        if markers != len(lengths):
            raise ValueError(f"format_conversation: the user turns hold {markers} {chat_format.marker!r} "
                             f"marker(s) but {len(lengths)} modality item(s) were given (one marker per item)")
    used = 0
    for index, turn in enumerate(conversation):
        role, content = turn.get("from", "").lower(), turn.get("value", "")
        if role in USER_ROLES:
            if chat_format.layout == "placeholder":
                count = content.count(chat_format.marker)
                piece, piece_mask = _encode_segments(chat_format.user(content), chat_format.marker,
                                                     lengths[used:used + count], tokenizer)
                used += count
            else:
                piece = tokenizer.encode(chat_format.user(content))
                piece_mask = [False] * len(piece)
            piece_labels = [IGNORE_INDEX] * len(piece)
        elif role in ASSISTANT_ROLES:
            piece = tokenizer.encode(chat_format.assistant(content))
            piece_mask, piece_labels = [False] * len(piece), list(piece)
        else:
            raise ValueError(f"format_conversation: turn {index} has role {turn.get('from')!r}; expected one of "
                             f"{USER_ROLES + ASSISTANT_ROLES}")
        ids += piece
        mask += piece_mask
        labels += piece_labels
    return MultimodalExample(np.asarray(ids, np.int32), np.asarray(mask, bool), np.asarray(labels, np.int32),
                             tuple(lengths))


def generation_prompt(question: str, modality_lengths: Sequence[int] = (), chat_format: ChatFormat = LATER,
                      tokenizer: WorldTokenizer | None = None) -> MultimodalExample:
    """The evaluation prompt `\\x16User: {q}\\x17\\x16Assistant:` (eval/vqa2.py) with its modality slots."""
    tokenizer = tokenizer or world_tokenizer()
    example = format_conversation([{"from": "human", "value": question}], modality_lengths, chat_format, tokenizer)
    header = tokenizer.encode(f"{TURN_START}Assistant:")
    return MultimodalExample(
        np.concatenate([example.input_ids, np.asarray(header, np.int32)]),
        np.concatenate([example.modality_mask, np.zeros(len(header), bool)]),
        np.concatenate([example.labels, np.full(len(header), IGNORE_INDEX, np.int32)]),
        example.modality_lengths)


def batch_length(lengths: Sequence[int], ctx_len: int | None, multiple: int = 16) -> int:
    """The paper-era batch length: the longest sample rounded up to `multiple`, capped at ctx_len."""
    length = -(-max(lengths) // multiple) * multiple
    return length if ctx_len is None else min(length, ctx_len)


def pack_for_training(example: MultimodalExample, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-token rows of `length` positions, as the reference builds them (world/cat.py mod_pad_text).

    The sequence is right-padded with id 0 / label IGNORE_INDEX (or cut) to length + 1; inputs are its
    first `length` positions and targets its labels shifted left by one, so the last modality slot
    predicts the first text token. Returns (input_ids, modality_mask, targets), each [length].
    """
    total = len(example.input_ids)
    if total > length + 1 and example.modality_mask[length:].any():
        raise ValueError(f"pack_for_training: cutting the {total}-token sequence to {length + 1} would drop "
                         f"{int(example.modality_mask[length:].sum())} modality slot(s); raise the length")
    pad = max(length + 1 - total, 0)
    ids = np.pad(example.input_ids[:length + 1], (0, pad), constant_values=PREPEND_SLOT_ID)
    mask = np.pad(example.modality_mask[:length + 1], (0, pad), constant_values=False)
    labels = np.pad(example.labels[:length + 1], (0, pad), constant_values=IGNORE_INDEX)
    return ids[:-1], mask[:-1], labels[1:]


# -------------------------------------------------------------------------------------------------
# Splicing


def modality_embeddings(example: MultimodalExample, features: Sequence[jax.Array | np.ndarray]) -> jax.Array:
    """The adapter outputs of the example's items ([n_i, C] each) concatenated to [n_slots, C], checked."""
    if len(features) != len(example.modality_lengths):
        raise ValueError(f"modality_embeddings: {len(features)} feature arrays for "
                         f"{len(example.modality_lengths)} modality item(s)")
    for i, (item, slots) in enumerate(zip(features, example.modality_lengths)):
        if item.ndim != 2 or item.shape[0] != slots:
            raise ValueError(f"modality_embeddings: item {i} has {slots} slot(s) in the text but its adapter "
                             f"output has shape {tuple(item.shape)}; expected [{slots}, C]")
    return jnp.concatenate([jnp.asarray(item) for item in features], axis=0)


def splice(token_embeds: jax.Array, modality_embeds: jax.Array, modality_mask: jax.Array,
           counts: jax.Array | None = None) -> jax.Array:
    """Writes modality_embeds [..., N, C] into token_embeds [..., T, C] at the True slots of mask [..., T].

    Slot j (in order) takes modality row j, like the reference's masked_scatter. `counts` [...]: how many
    of the N rows are valid per row (variable-length audio; default all N). Fixed shapes, so it jits; when
    the mask and counts are concrete, a slot count other than the valid rows' raises, naming both counts.
    """
    if not isinstance(modality_mask, jax.core.Tracer) and not isinstance(counts, jax.core.Tracer):
        slots = np.asarray(modality_mask).sum(axis=-1)
        want = np.full_like(slots, modality_embeds.shape[-2]) if counts is None else np.asarray(counts)
        if np.any(slots != want):
            given = modality_embeds.shape[-2] if counts is None else f"{np.unique(want).tolist()} valid"
            raise ValueError(f"splice: the mask marks {np.unique(slots).tolist()} modality slot(s) per row but "
                             f"{given} modality embeddings were given")
    if modality_embeds.shape[-2] == 0:
        return token_embeds
    index = jnp.clip(jnp.cumsum(modality_mask, axis=-1) - 1, 0, modality_embeds.shape[-2] - 1)  # [..., T]
    gathered = jnp.take_along_axis(modality_embeds, index[..., None], axis=-2)  # [..., T, C]
    return jnp.where(modality_mask[..., None], gathered.astype(token_embeds.dtype), token_embeds)


# -------------------------------------------------------------------------------------------------
# Reference checkpoint layouts

PAPER_ENCODER = "modality.world_encoder.model."
PAPER_ADAPTER = "modality.world_encoder.adapter."
LATER_LLM = "llm."
LATER_PROJ = "proj."
LATER_ENCODER = "encoder.model."
LATER_AUDIO_ADAPTER = "encoder.adapter."
# Prefix that turns the reference encoder's tensor names into those of its HF checkpoint (what
# rwkv_jax.encoders.load reads): the reference keeps `.vision_model` of a SigLIP model, a
# CLIPVisionModel (whose names start with `vision_model.` under transformers 4), `.model.encoder` of a
# Whisper model and a WavLM AutoModel.
ENCODER_HF_PREFIX = {"siglip": "vision_model.", "clip": "", "whisper": "model.encoder.", "speech": ""}
_RWKV_NAME = re.compile(r"(emb\.weight|head\.weight|ln_out\.(weight|bias)|blocks\.\d+\..+)$")
# Reference module name (per layout) <-> our param path, for each connector.
_VISION_PAPER = {"proj.0": "fc1", "proj.2": "fc2", "pre_norm": "pre_norm"}
_VISION_LATER = {"mlp.0": "fc1", "mlp.2": "fc2", "pre_norm": "pre_norm"}
_AUDIO = {"conv": "conv", "proj.0": "fc1", "proj.2": "fc2"}


@dataclasses.dataclass
class ReferenceCheckpoint:
    """A reference (WorldRWKV) state dict split into our parts; `export_reference` inverts `import_reference`.

    rwkv: official RWKV-7 tensor names (as rwkv_jax.model reads them) -> arrays.
    adapter / compressor: param trees of VisionAdapter or AudioAdapter / VisionCompressor (None if absent).
    encoder: the encoder's tensors named as in the reference's encoder module (add ENCODER_HF_PREFIX[type]
    for its HF checkpoint names); empty when the checkpoint did not save the encoder.
    layout: 'paper' (modality.world_encoder.*) or 'later' (llm.* / proj.* / encoder.model.*).
    modality: 'vision', 'audio' or None (no connector in the file).
    """

    rwkv: dict[str, np.ndarray]
    adapter: Params | None
    compressor: Params | None
    encoder: dict[str, np.ndarray]
    layout: str
    modality: str | None


def _linear_param(module: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A torch Linear / Conv1d / LayerNorm tensor as (our leaf name, our layout)."""
    if module == "pre_norm":
        return {"weight": "scale", "bias": "bias"}[leaf], value
    if leaf == "bias":
        return "bias", value
    return "kernel", conv_kernel(value) if value.ndim == 3 else np.ascontiguousarray(value.T)


def _torch_param(module: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Inverse of `_linear_param`."""
    if module == "pre_norm":
        return {"scale": "weight", "bias": "bias"}[leaf], value
    if leaf == "bias":
        return "bias", value
    if module == "conv":
        return "weight", conv_weight(value, AUDIO_CONV_KERNEL)
    return "weight", np.ascontiguousarray(value.T)


def _split_connector(tensors: dict[str, np.ndarray], names: dict[str, str], source: str,
                     what: str) -> Params:
    """{reference module.leaf: array} -> our param tree, by the module-name table `names`."""
    tree: Params = {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if module not in names or leaf not in ("weight", "bias"):
            raise ValueError(f"{source}: unexpected {what} tensor {key!r}; expected modules {sorted(names)}")
        ours, converted = _linear_param(module, leaf, np.asarray(value))
        tree.setdefault(names[module], {})[ours] = converted
    return tree


def _join_connector(tree: Params, names: dict[str, str], prefix: str) -> dict[str, np.ndarray]:
    """Inverse of `_split_connector`, with `prefix` on every name."""
    inverse = {ours: module for module, ours in names.items()}
    out = {}
    for ours, leaves in tree.items():
        module = inverse[ours]
        for leaf, value in leaves.items():
            name, converted = _torch_param(module, leaf, np.asarray(value))
            out[f"{prefix}{module}.{name}"] = converted
    return out


def _compressor_tree(weight: np.ndarray) -> Params:
    return {"conv": {"kernel": conv_kernel(np.asarray(weight))}}


def _compressor_weight(tree: Params) -> np.ndarray:
    kernel = np.asarray(tree["conv"]["kernel"])
    return conv_weight(kernel, kernel.shape[0] // kernel.shape[1])


def _take(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def import_reference(tensors: Mapping[str, np.ndarray], source: str = "<checkpoint>") -> ReferenceCheckpoint:
    """Splits a reference state dict (either layout, numpy arrays) into our parts; unknown names raise."""
    later = any(k.startswith((LATER_LLM, LATER_PROJ, LATER_ENCODER, LATER_AUDIO_ADAPTER)) for k in tensors)
    if later:
        rwkv = _take(tensors, LATER_LLM)
        encoder = _take(tensors, LATER_ENCODER)
        proj = _take(tensors, LATER_PROJ)
        audio = _take(tensors, LATER_AUDIO_ADAPTER)
        known = (LATER_LLM, LATER_ENCODER, LATER_PROJ, LATER_AUDIO_ADAPTER)
        if proj and audio:
            raise ValueError(f"{source}: holds both a vision projector (proj.*) and an audio adapter "
                             f"(encoder.adapter.*)")
        compressor_weight = proj.pop("conv.weight", None)
        vision_names = _VISION_LATER
        adapter_tensors = proj or audio
        modality = "vision" if proj or compressor_weight is not None else ("audio" if audio else None)
    else:
        encoder = _take(tensors, PAPER_ENCODER)
        adapter_tensors = _take(tensors, PAPER_ADAPTER)
        known = (PAPER_ENCODER, PAPER_ADAPTER)
        rwkv = {k: v for k, v in tensors.items() if not k.startswith(known)}
        vision = any(k.startswith("pre_norm.") for k in adapter_tensors)
        compressor_weight = adapter_tensors.pop("conv.weight") if vision and "conv.weight" in adapter_tensors \
            else None
        vision_names = _VISION_PAPER
        modality = ("vision" if vision else "audio") if adapter_tensors else None
    unknown = [k for k in tensors if not k.startswith(known)] if later else []
    unknown = sorted(set(unknown) | {k for k in rwkv if not _RWKV_NAME.match(k)})
    if unknown:
        names = unknown
        raise ValueError(f"{source}: tensors {names[:5]}{' ...' if len(names) > 5 else ''} belong to no part of a "
                         f"{'later' if later else 'paper-era'} WorldRWKV checkpoint")
    names = vision_names if modality == "vision" else _AUDIO
    adapter = _split_connector(adapter_tensors, names, source, f"{modality} adapter") if adapter_tensors else None
    compressor = _compressor_tree(compressor_weight) if compressor_weight is not None else None
    return ReferenceCheckpoint(dict(rwkv), adapter, compressor, dict(encoder), "later" if later else "paper",
                               modality)


def export_reference(checkpoint: ReferenceCheckpoint) -> dict[str, np.ndarray]:
    """The reference state dict of `checkpoint.layout` (inverse of `import_reference`)."""
    if checkpoint.layout not in ("paper", "later"):
        raise ValueError(f"export_reference: layout must be 'paper' or 'later', got {checkpoint.layout!r}")
    paper = checkpoint.layout == "paper"
    vision = checkpoint.modality == "vision"
    out: dict[str, np.ndarray] = {}
    out.update({(k if paper else LATER_LLM + k): np.asarray(v) for k, v in checkpoint.rwkv.items()})
    encoder_prefix = PAPER_ENCODER if paper else LATER_ENCODER
    out.update({encoder_prefix + k: np.asarray(v) for k, v in checkpoint.encoder.items()})
    if paper:
        adapter_prefix, names = PAPER_ADAPTER, (_VISION_PAPER if vision else _AUDIO)
    else:
        adapter_prefix, names = (LATER_PROJ, _VISION_LATER) if vision else (LATER_AUDIO_ADAPTER, _AUDIO)
    if checkpoint.adapter is not None:
        out.update(_join_connector(nn.unbox(checkpoint.adapter), names, adapter_prefix))
    if checkpoint.compressor is not None:
        if not vision:
            raise ValueError("export_reference: a compressor belongs to a vision checkpoint")
        out[adapter_prefix + "conv.weight"] = _compressor_weight(nn.unbox(checkpoint.compressor))
    return out


def detect_encoder_type(encoder: Mapping[str, np.ndarray]) -> str | None:
    """The reference encoder type ('siglip', 'clip', 'whisper', 'speech') from its tensor names; None if empty."""
    if not encoder:
        return None
    if any(k.startswith(("vision_model.", "pre_layrnorm.")) for k in encoder):
        return "clip"
    if "conv1.weight" in encoder:
        return "whisper"
    if any(k.startswith("feature_extractor.") for k in encoder):
        return "speech"
    if any(k.startswith("embeddings.patch_embedding.") for k in encoder):
        return "siglip"
    raise ValueError(f"detect_encoder_type: tensors such as {sorted(encoder)[:3]} match no reference encoder "
                     f"({sorted(ENCODER_HF_PREFIX)})")


def encoder_hf_tensors(checkpoint: ReferenceCheckpoint, encoder_type: str | None = None) -> dict[str, np.ndarray]:
    """The checkpoint's encoder tensors under their HF checkpoint names (what rwkv_jax.encoders.load reads).

    encoder_type as the reference names it; detected from the tensor names when None.
    """
    encoder_type = encoder_type or detect_encoder_type(checkpoint.encoder)
    if encoder_type is None:
        return {}
    if encoder_type not in ENCODER_HF_PREFIX:
        raise ValueError(f"encoder_hf_tensors: encoder_type {encoder_type!r}; known: {sorted(ENCODER_HF_PREFIX)}")
    return {ENCODER_HF_PREFIX[encoder_type] + k: v for k, v in checkpoint.encoder.items()}
