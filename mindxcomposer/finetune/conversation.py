"""Upstream's `conv2text` (finetune/data_mix.py): a conversation record to the training text."""
from typing import Mapping, Sequence

from ..prompt import BEGIN_TURN, END_TURN, IMAGE_MARKER

HUMAN_ROLES = ("human", "user")  # compared lower-cased; any other `from` is the assistant, as upstream
END_OF_TEXT = "</s>"


def conv2text(conversations: Sequence[Mapping[str, str]]) -> str:
    """`[UNUSED_TOKEN_146]user\\n{value}[UNUSED_TOKEN_145]\\n` per human turn, the same with `assistant`
    for every other turn, values stripped, then `</s>`. The same string upstream builds, character for
    character."""
    text = ""
    for turn in conversations:
        role = "user" if turn["from"].lower() in HUMAN_ROLES else "assistant"
        text += f"{BEGIN_TURN}{role}\n{turn['value'].strip()}{END_TURN}\n"
    return text + END_OF_TEXT


def count_markers(text: str) -> int:
    return text.count(IMAGE_MARKER)
