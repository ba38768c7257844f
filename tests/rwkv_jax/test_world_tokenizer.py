"""World tokenizer: round trip and parity with the rwkv package's TRIE_TOKENIZER."""

import pytest

from rwkv_jax.tokenizer import VOCAB_FILE, WorldTokenizer, world_tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "\x16User: What is 2+2?\x17\x16Assistant:",
    "User: hi\n\nAssistant: Hello!\n\n",
    "中文分词测试，RWKV 是一个 RNN。",
    "日本語のテキストと emoji 🦢🚀 mixed\twith tabs",
    "Ünïcödé façade — “quotes” … ½ ∑ ∫ ≠",
    "def f(x):\n    return x ** 2  # comment\n" + " " * 200 + "-" * 100,
    "\x00\x01\x7f control bytes",
]


@pytest.fixture(scope="module")
def tok():
    return world_tokenizer()


def test_known_ids(tok):
    assert tok.encode("\n") == [11]
    assert tok.encode("\x16") == [23]
    assert tok.encode("\x17") == [24]
    assert tok.encode("\n\n") == [261]
    assert max(tok.id_to_bytes) == 65529


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_bytes_round_trip_and_invalid_utf8(tok):
    data = bytes(range(256)) + "🦢".encode()[:3]
    assert tok.decode_bytes(tok.encode_bytes(data)) == data
    assert tok.decode(tok.encode_bytes(b"ab\xff")) == "ab\ufffd"
    assert tok.decode([0, *tok.encode("x"), 0]) == "x"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([65535])


def test_parity_with_rwkv_package(tok):
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    ref = rwkv_tokenizer.TRIE_TOKENIZER(VOCAB_FILE)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        ids = ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids)


def test_bad_vocab_file(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 'ab' 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.txt:1"):
        WorldTokenizer(str(bad))
