"""Tokenizer and chat template against transformers on an R1-style tokenizer built by the test."""

import pytest

transformers = pytest.importorskip("transformers")

from jaxrl_peft.models import hf, tiny  # noqa: E402

CORPUS = ["Solve 2 + 3. <think>\nAdd them.\n</think>\nThe answer is \\boxed{5}.",
          "What is 12 * 7? Let's think step by step.", "Answer: 42", "x = \\frac{1}{2}"] * 20

CONVERSATIONS = [
    [{"role": "user", "content": "What is 1+1?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Solve x + 2 = 5."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\nHello!"},
     {"role": "user", "content": "Compute 3*4, put the answer in \\boxed{}."}],
    [{"role": "system", "content": "Reason first."}, {"role": "user", "content": "ünïcode ✓ 数学"},
     {"role": "assistant", "content": "Fine."}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny.build_r1_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS, vocab_size=400)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok_dir, conv, gen):
    ours = hf.Tokenizer(tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    text = ours.apply_chat_template(conv, add_generation_prompt=gen)
    assert text == theirs.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
    ids = theirs.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True) == list(ids)
    if gen:
        assert text.endswith("<｜Assistant｜><think>\n") and text.startswith(tiny.BOS)


def test_encode_decode_and_special_ids(tok_dir):
    ours = hf.Tokenizer(tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for s in CORPUS[:4] + ["ünïcode ✓ 数学 </think>"]:
        ids = ours.encode(s)
        assert ids == theirs.encode(s, add_special_tokens=False)
        assert ours.decode(ids) == s
    assert ours.eos_id == theirs.eos_token_id and ours.bos_id == theirs.bos_token_id
    assert ours.pad_id == ours.eos_id


def test_missing_tokenizer_fails_clearly(tmp_path):
    with pytest.raises(hf.CheckpointError, match="missing tokenizer.json"):
        hf.Tokenizer(tmp_path)
