"""Named prompt templates for math problems, rendered through the model's chat template.

`dapo` is the study's training/evaluation instruction (DAPO-Math-17k's "Answer:" wording, graded from
the `Answer:` line or a box); `boxed` is the lighteval-style `\\boxed{}` instruction. Templates with a
system prompt reproduce the study's training setting (an R1-style "think first" system message).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
BOXED_SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
MATH_PARQUET_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."

# Our wording of the study's training system prompt (its exact text is not public in our sources).
R1_SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process as an internal monologue "
    "and then give the user the answer. Respond in the following format: <think>\n...\n</think>\n"
    "followed by the answer."
)


class ChatTokenizer(Protocol):
    """What prompt rendering needs from a tokenizer (jaxrl_peft.models.hf provides one)."""

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How a bare problem becomes chat messages: `user` has one `{problem}` slot."""

    name: str
    user: str
    system: str | None = None

    def messages(self, problem: str) -> list[dict[str, str]]:
        """[system?, user] chat messages for `problem`."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": self.user.replace("{problem}", problem)})
        return msgs


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate("dapo", DAPO_PREFIX + "{problem}" + DAPO_SUFFIX),
        PromptTemplate("dapo_system", DAPO_PREFIX + "{problem}" + DAPO_SUFFIX, R1_SYSTEM_PROMPT),
        PromptTemplate("boxed", "{problem}" + BOXED_SUFFIX),
        PromptTemplate("boxed_system", "{problem}" + BOXED_SUFFIX, R1_SYSTEM_PROMPT),
        PromptTemplate("plain", "{problem}"),
    )
}


def get_template(name: str) -> PromptTemplate:
    """The template called `name` (see TEMPLATES)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def strip_instruction(text: str) -> str:
    """The bare problem from a prompt that already carries a known instruction (DAPO wrapper, the MATH
    parquet's or lighteval's `\\boxed{}` sentence), so that any template can be applied to it."""
    t = text.strip()
    if t.startswith(DAPO_PREFIX.strip()):
        t = t[len(DAPO_PREFIX.strip()) :].lstrip()
    for suffix in (DAPO_SUFFIX, MATH_PARQUET_SUFFIX, BOXED_SUFFIX):
        if t.endswith(suffix.strip()):
            t = t[: -len(suffix.strip())].rstrip()
    return t


def build_prompt(problem: str, tokenizer: ChatTokenizer, template: str | PromptTemplate = "dapo") -> str:
    """Prompt text for `problem`: template messages rendered by `tokenizer.apply_chat_template`."""
    tmpl = get_template(template) if isinstance(template, str) else template
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} has no apply_chat_template(messages, add_generation_prompt)"
        )
    return tokenizer.apply_chat_template(tmpl.messages(problem), add_generation_prompt=True)


def prompt_ids(problems: Sequence[str], tokenizer: ChatTokenizer, template: str | PromptTemplate,
               max_prompt_tokens: int) -> tuple[list[list[int]], int]:
    """The one prompt builder: chat-formatted prompt tokens of each problem, cut from the left to
    `max_prompt_tokens`; and how many prompts were cut."""
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    ids, cut = [], 0
    for p in problems:
        t = tokenizer.encode(build_prompt(p, tokenizer, template))
        cut += len(t) > max_prompt_tokens
        ids.append(list(t[-max_prompt_tokens:]))
    return ids, cut
