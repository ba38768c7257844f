"""ModRWKV chat format, labels and splicing against re-implementations of the reference data code.

The references below follow JL-er/WorldRWKV: `process_tokens` (world/dataset.py) and `mod_pad_text`
(world/cat.py) at the paper-era commit f15e179; `process_vision_text` (world/utils.py) at HEAD, which
tokenises with the extended vocab wr_vocab_v20230424.txt (the World vocab + 3 vision tokens). Tokens come
from the `rwkv` package's TRIE_TOKENIZER, not from rwkv_jax.tokenizer.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rwkv
import torch
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from rwkv_jax import multimodal as mm
from rwkv_jax.tokenizer import world_tokenizer

RWKV_VOCAB = os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt")
CONVERSATION = [
    {"from": "human", "value": "What is in the picture?\nAnswer briefly."},
    {"from": "gpt", "value": "A cat on a mat."},
    {"from": "human", "value": "And its colour?"},
    {"from": "gpt", "value": "Black, with white paws."},
]


@pytest.fixture(scope="module")
def world_trie():
    return TRIE_TOKENIZER(RWKV_VOCAB)


@pytest.fixture(scope="module")
def extended_trie(tmp_path_factory):
    """The later reference's wr_vocab: the World vocab with ids 65530-65532 appended."""
    path = tmp_path_factory.mktemp("vocab") / "wr_vocab_v20230424.txt"
    with open(RWKV_VOCAB, encoding="utf-8") as f:
        text = f.read().rstrip("\n") + "\n"
    text += "65530 '<|vision_start|>' 16\n65531 '<|vision_end|>' 14\n65532 '<|image_pad|>' 13\n"
    path.write_text(text, encoding="utf-8")
    return TRIE_TOKENIZER(str(path))


def reference_process_tokens(conversations, trie):
    """world/dataset.py process_tokens (paper era): per-turn tokens; labels on assistant turns only."""
    inputs, labels = [], []
    for conv in conversations:
        role, content = conv["from"].lower(), conv["value"]
        if role == "human":
            piece = trie.encode(f"\x16User: {content}\x17")
            label = [-100] * len(piece)
        elif role in ("assistant", "gpt"):
            piece = trie.encode(f"\x16Assistant: {content}\x17")
            label = list(piece)
        inputs += piece
        labels += label
    return inputs, labels


def reference_mod_pad_text(modality_len, tokens, labels, target_len):
    """world/cat.py mod_pad_text for one sample: text inputs (after the modality) and next-token targets."""
    labels = [-100] * modality_len + labels
    pad_len = target_len - (len(tokens) + modality_len)
    pad = lambda seq, value: seq + [value] * pad_len if pad_len >= 0 else seq[:pad_len]  # noqa: E731 (F.pad)
    return pad(tokens, 0)[:-1], pad(labels, -100)[1:]


def reference_process_vision_text(conversations, trie, image_token_length, max_length):
    """world/utils.py process_vision_text (HEAD): placeholders, whole-turn tokenisation, pad to max_length."""
    inputs, labels, index = [], [], 0
    for conv in conversations:
        role, content = conv["from"].lower(), conv["value"]
        if role in ("user", "human"):
            if "<image>" in content:
                parts = content.split("<image>")
                new_parts = []
                for part in parts[:-1]:
                    new_parts += [part, "<|vision_start|>" + "<|image_pad|>" * image_token_length[index]
                                  + "<|vision_end|>"]
                    index += 1
                content = "".join(new_parts + [parts[-1]])
            piece = trie.encode(f"\x16User:{content}\x17")
            label = [-100] * len(piece)
        elif role in ("assistant", "gpt"):
            piece = trie.encode(f"\x16Assistant:{content}\x17")
            label = list(piece)
        inputs += piece
        labels += label
    pad_length = max_length - len(labels) + 1
    return (inputs + [0] * pad_length)[:-1], (labels + [-100] * pad_length)[1:]


@pytest.mark.parametrize("ctx_len", [None, 24])
def test_paper_era_format_and_packing_match_reference(world_trie, ctx_len):
    conversation = mm.prepend_markers(CONVERSATION, 1, "<image>\n")
    example = mm.format_conversation(conversation, [5], mm.PAPER_ERA)
    tokens, labels = reference_process_tokens(conversation, world_trie)
    np.testing.assert_array_equal(example.modality_mask, [True] * 5 + [False] * len(tokens))
    np.testing.assert_array_equal(example.input_ids[5:], tokens)
    np.testing.assert_array_equal(example.labels, [-100] * 5 + labels)

    length = mm.batch_length([len(example.input_ids)], ctx_len)
    assert length == (24 if ctx_len else -(-len(example.input_ids) // 16) * 16)
    ids, mask, targets = mm.pack_for_training(example, length)
    ref_inputs, ref_targets = reference_mod_pad_text(5, tokens, labels, length + 1)
    np.testing.assert_array_equal(mask, [True] * 5 + [False] * (length - 5))
    np.testing.assert_array_equal(ids[5:], ref_inputs)
    np.testing.assert_array_equal(targets, ref_targets)
    assert targets[4] == -100 and example.input_ids[5] == 23  # the first text token is the user's '\x16'


def test_later_format_with_interleaved_images_matches_reference(extended_trie):
    conversation = mm.prepend_markers(CONVERSATION, 2)
    conversation[2] = {"from": "human", "value": "Compare with this one:<image>Which is darker?"}
    lengths = [4, 3, 2]
    example = mm.format_conversation(conversation, lengths, mm.LATER)
    ids, mask, targets = mm.pack_for_training(example, 96)
    ref_inputs, ref_targets = reference_process_vision_text(conversation, extended_trie, lengths, 96)
    np.testing.assert_array_equal(ids, ref_inputs)
    np.testing.assert_array_equal(targets, ref_targets)
    np.testing.assert_array_equal(mask, np.asarray(ref_inputs) == mm.IMAGE_PAD_ID)
    assert example.modality_lengths == (4, 3, 2) and int(mask.sum()) == 9


def test_hand_checked_placeholder_conversation():
    tok = world_tokenizer()
    example = mm.format_conversation([{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo"}],
                                     [2], mm.LATER)
    user = tok.encode("\x16User:") + [65530, 65532, 65532, 65531] + tok.encode("Hi\x17")
    answer = tok.encode("\x16Assistant:Yo\x17")
    assert user[0] == 23 and answer[0] == 23 and answer[-1] == 24 == user[-1]
    assert example.input_ids.tolist() == user + answer
    assert example.labels.tolist() == [-100] * len(user) + answer
    slots = [i for i, t in enumerate(user) if t == 65532]
    assert np.flatnonzero(example.modality_mask).tolist() == slots
    assert tok.decode(answer) == "\x16Assistant:Yo\x17"


def test_asr_sample_is_all_labelled_after_the_audio():
    tok = world_tokenizer()
    example = mm.format_conversation([{"from": "gpt", "value": "hello world"}], [3], mm.PAPER_ERA)
    text = tok.encode("\x16Assistant: hello world\x17")
    assert example.input_ids.tolist() == [0, 0, 0] + text
    assert example.labels.tolist() == [-100] * 3 + text
    ids, mask, targets = mm.pack_for_training(example, 16)
    assert targets.tolist() == [-100] * 2 + text + [-100] * (14 - len(text))  # the last slot predicts '\x16'
    assert ids.tolist() == [0, 0, 0] + text + [0] * (13 - len(text)) and mask.sum() == 3


def test_generation_prompt_matches_the_eval_string(world_trie):
    prompt = mm.generation_prompt("What colour is the cat?", [4], mm.PAPER_ERA)
    expected = world_trie.encode("\x16User: What colour is the cat?\x17\x16Assistant:")
    np.testing.assert_array_equal(prompt.input_ids[4:], expected)
    assert prompt.modality_mask.tolist() == [True] * 4 + [False] * len(expected)
    assert (prompt.labels == -100).all()


def test_wrong_modality_counts_raise():
    with pytest.raises(ValueError, match="hold 1 '<image>' marker.*2 modality item"):
        mm.format_conversation(mm.prepend_markers(CONVERSATION, 1), [4, 4], mm.LATER)
    with pytest.raises(ValueError, match="turn 1 has role 'system'"):
        mm.format_conversation([CONVERSATION[0], {"from": "system", "value": "x"}])
    example = mm.format_conversation(mm.prepend_markers(CONVERSATION, 2), [4, 3], mm.LATER)
    with pytest.raises(ValueError, match="item 1 has 3 slot.*shape \\(2, 8\\)"):
        mm.modality_embeddings(example, [np.zeros((4, 8)), np.zeros((2, 8))])
    tokens = jnp.zeros((len(example.input_ids), 8))
    with pytest.raises(ValueError, match="marks \\[7\\] modality slot.*6 modality embeddings"):
        mm.splice(tokens, jnp.zeros((6, 8)), example.modality_mask)
    with pytest.raises(ValueError, match="would drop"):
        mm.pack_for_training(example, 5)


def test_splice_matches_torch_masked_scatter_under_jit():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, 10, 4)).astype(np.float32)
    modality = rng.standard_normal((2, 3, 4)).astype(np.float32)
    mask = np.zeros((2, 10), bool)
    mask[0, [1, 2, 7]] = True
    mask[1, [0, 8, 9]] = True
    ours = jax.jit(mm.splice)(jnp.asarray(tokens), jnp.asarray(modality), jnp.asarray(mask))
    mask_t = torch.from_numpy(mask).unsqueeze(-1).expand(2, 10, 4)
    expected = torch.from_numpy(tokens).masked_scatter(mask_t, torch.from_numpy(modality).reshape(-1, 4))
    np.testing.assert_array_equal(np.asarray(ours), expected.numpy())
    single = mm.splice(jnp.asarray(tokens[1]), jnp.asarray(modality[1]), mask[1])
    np.testing.assert_array_equal(np.asarray(single), expected.numpy()[1])


def test_spliced_example_end_to_end():
    example = mm.format_conversation(mm.prepend_markers(CONVERSATION, 2), [4, 3], mm.LATER)
    features = [np.full((4, 8), 1.0, np.float32), np.full((3, 8), 2.0, np.float32)]
    table = np.arange(65536, dtype=np.float32)[:, None] * np.ones((1, 8), np.float32) * 1e-3
    embeds = mm.splice(jnp.asarray(table[example.input_ids]), mm.modality_embeddings(example, features),
                       example.modality_mask)
    slots = np.flatnonzero(example.modality_mask)
    np.testing.assert_array_equal(np.asarray(embeds)[slots, 0], [1, 1, 1, 1, 2, 2, 2])
    text = np.flatnonzero(~example.modality_mask)
    np.testing.assert_array_equal(np.asarray(embeds)[text], table[example.input_ids[text]])
