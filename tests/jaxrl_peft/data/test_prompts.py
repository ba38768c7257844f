"""Prompt templates and their rendering through a tokenizer's chat template."""

import pytest

from jaxrl_peft.data.prompts import TEMPLATES, build_prompt, get_template, strip_instruction


class FakeTokenizer:
    """Renders like the R1-Distill template: system text after BOS, then user, then assistant + <think>."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        system = "".join(m["content"] for m in messages if m["role"] == "system")
        user = "".join(f"<|User|>{m['content']}" for m in messages if m["role"] == "user")
        return f"<bos>{system}{user}" + ("<|Assistant|><think>\n" if add_generation_prompt else "")


def test_dapo_template_wraps_problem():
    msgs = get_template("dapo").messages("What is 1+1?")
    assert msgs == [{"role": "user", "content": msgs[0]["content"]}]
    text = msgs[0]["content"]
    assert text.startswith("Solve the following math problem step by step.")
    assert "\n\nWhat is 1+1?\n\n" in text
    assert text.endswith('Remember to put your answer on its own line after "Answer:".')


def test_boxed_and_system_templates():
    assert get_template("boxed").messages("Q")[0]["content"] == (
        "Q Please reason step by step, and put your final answer within \\boxed{}."
    )
    msgs = get_template("dapo_system").messages("Q")
    assert [m["role"] for m in msgs] == ["system", "user"] and "<think>" in msgs[0]["content"]


def test_build_prompt_uses_chat_template():
    prompt = build_prompt("What is 2+2?", FakeTokenizer(), "boxed")
    assert prompt.startswith("<bos><|User|>What is 2+2? Please reason")
    assert prompt.endswith("<|Assistant|><think>\n")
    with pytest.raises(TypeError, match="apply_chat_template"):
        build_prompt("Q", object())
    with pytest.raises(ValueError, match="unknown prompt template 'nope'"):
        build_prompt("Q", FakeTokenizer(), "nope")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_strip_instruction_inverts_every_template(name):
    problem = "Find $x$ if $2x = 4$."
    assert strip_instruction(get_template(name).messages(problem)[-1]["content"]) == problem
