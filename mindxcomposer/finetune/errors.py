"""Errors for fine-tuning data: every message names the file and the sample it is about."""
from ..errors import InputError


class FinetuneDataError(InputError):
    """A data file or sample that cannot be trained on (malformed record, missing image, markers that do
    not match the images, empty conversation, nothing left to learn after truncation, ...)."""


def describe(source: str, index: int, sample_id=None) -> str:
    """'data/x.json sample #3 (id 17)': how errors point at a sample."""
    where = f"{source} sample #{index}"
    return where if sample_id is None else f"{where} (id {sample_id!r})"
