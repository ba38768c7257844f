"""The RWKV World tokenizer: greedy longest match over a byte trie of `rwkv_vocab_v20230424`.

Ids 1-256 are the single bytes 0x00-0xFF (id = byte + 1), so every input encodes; id 0 is
end-of-text / padding. Same output as the rwkv package's TRIE_TOKENIZER.
"""

from __future__ import annotations

import ast
import functools
import os
import threading
from typing import Iterable

VOCAB_FILE = os.path.join(os.path.dirname(__file__), "rwkv_vocab_v20230424.txt")
EOS_ID = 0
_END = -1  # trie key holding the id of the token that ends at a node


class WorldTokenizer:
    """Byte-level trie tokenizer over an RWKV vocab file (`<id> <python literal> <byte length>`)."""

    vocab_size = 65536  # the model's embedding rows; ids above the file's last id are unused
    eos_id = EOS_ID

    def __init__(self, vocab_file: str = VOCAB_FILE):
        self.id_to_bytes: dict[int, bytes] = {}
        with open(vocab_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                try:
                    idx = int(line[:line.index(" ")])
                    tok = ast.literal_eval(line[line.index(" "):line.rindex(" ")].strip())
                    length = int(line[line.rindex(" "):])
                except (ValueError, SyntaxError) as e:
                    raise ValueError(f"{vocab_file}:{lineno}: malformed vocab line {line!r}") from e
                tok = tok.encode("utf-8") if isinstance(tok, str) else tok
                if not isinstance(tok, bytes) or len(tok) != length:
                    raise ValueError(f"{vocab_file}:{lineno}: token {tok!r} does not have the "
                                     f"stated byte length {length}")
                self.id_to_bytes[idx] = tok
        self.token_to_id: dict[bytes, int] = {t: i for i, t in self.id_to_bytes.items()}
        self._trie: dict = {}
        for tok, idx in self.token_to_id.items():
            node = self._trie
            for byte in tok:
                node = node.setdefault(byte, {})
            node[_END] = idx
        missing = [b for b in range(256) if b not in self._trie or _END not in self._trie[b]]
        if missing:
            raise ValueError(f"{vocab_file}: single-byte tokens missing for bytes {missing[:8]}")

    def encode_bytes(self, data: bytes) -> list[int]:
        """Repeatedly takes the longest vocab token that prefixes the remaining bytes."""
        out = []
        i, n = 0, len(data)
        root = self._trie
        while i < n:
            node, j = root, i
            best, best_end = None, i
            while j < n:
                node = node.get(data[j])
                if node is None:
                    break
                j += 1
                idx = node.get(_END)
                if idx is not None:
                    best, best_end = idx, j
            out.append(best)
            i = best_end
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        """Concatenated token bytes; id 0 (end of text) decodes to nothing."""
        try:
            return b"".join(self.id_to_bytes[int(t)] for t in tokens if int(t) != EOS_ID)
        except KeyError as e:
            raise ValueError(f"decode: token id {e.args[0]} is not in the vocabulary") from None

    def decode(self, tokens: Iterable[int], errors: str = "replace") -> str:
        """UTF-8 text; invalid byte sequences (e.g. a cut multi-byte char) become U+FFFD."""
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)


_BUILD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _shipped() -> WorldTokenizer:
    return WorldTokenizer()


def world_tokenizer() -> WorldTokenizer:
    """The shipped World tokenizer, built once per process; thread-safe (grain reader threads call it, and
    parsing the vocab with `ast` in two threads at once crashes CPython 3.11)."""
    with _BUILD_LOCK:
        return _shipped()
