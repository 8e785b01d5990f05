"""Reading upstream's data files: a `.json` list of samples, or a `data.txt` naming several of them.

A sample is `{"id": ..., "conversations": [{"from": ..., "value": ...}, ...], "image": path | [paths]}`;
text-only samples have no `image`. One file holds one kind: upstream decides per file from its first
sample, and crashes (or drops the images) when a file mixes kinds; here that is an error.

`data.txt` has one `<file.json> [number]` per line (upstream `make_supervised_data_module`):
- with `given_num`, the number times 1000 is the sample count taken from the file: a random subset
  without repetition if the file has more, else the whole file plus random picks with repetition;
- without it, an optional ratio: below 1 a random subset of int(len * ratio) samples, above 1 the file
  plus int(len * ratio) - len random picks.
Upstream draws these from Python's unseeded global `random`; here from a `random.Random` seeded by the
caller, with the same calls in the same order (so seeding Python's `random` with the same seed before
upstream's loader picks the same samples).
Relative paths (data files in data.txt, images in samples) are relative to the working directory, as
upstream opens them, unless `root` is given.
"""
import json
import os
import random
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from .errors import FinetuneDataError, describe

MULTI = "multi"  # upstream's data_type names
TEXT = "text"


@dataclass(frozen=True)
class Record:
    source: str  # the data file, as named in data.txt or data_path
    index: int  # position in that file
    sample_id: Any
    conversations: Tuple[Tuple[str, str], ...]  # (from, value)
    images: Optional[Tuple[str, ...]]  # resolved paths; None for text-only samples

    @property
    def data_type(self) -> str:
        return TEXT if self.images is None else MULTI

    def describe(self) -> str:
        return describe(self.source, self.index, self.sample_id)


@dataclass
class DataGroup:
    """One data file after resampling: upstream's `Sample_dataset`."""
    source: str
    data_type: str
    records: List[Record]


def _resolve(path: str, root: Optional[str]) -> str:
    return path if os.path.isabs(path) or root is None else os.path.join(root, path)


def _parse_record(raw, source: str, index: int, root: Optional[str]) -> Record:
    if not isinstance(raw, dict):
        raise FinetuneDataError(f"{describe(source, index)}: a sample must be a JSON object, got {type(raw).__name__}")
    where = describe(source, index, raw.get("id"))
    conversations = raw.get("conversations")
    if not isinstance(conversations, list):
        raise FinetuneDataError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} turns, "
                                f"got {type(conversations).__name__}")
    if not conversations:
        raise FinetuneDataError(f"{where}: the conversation is empty")
    turns = []
    for t, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise FinetuneDataError(f"{where}: turn {t} must be an object with string 'from' and 'value', got {turn!r}")
        turns.append((turn["from"], turn["value"]))
    images = None
    if "image" in raw:
        image = raw["image"]
        if isinstance(image, str):
            images = (image,)
        elif isinstance(image, list) and image and all(isinstance(p, str) for p in image):
            images = tuple(image)
        else:
            raise FinetuneDataError(f"{where}: 'image' must be a path or a non-empty list of paths, got {image!r} "
                                    "(text-only samples have no 'image' key)")
        images = tuple(_resolve(p, root) for p in images)
    return Record(source, index, raw.get("id"), tuple(turns), images)


def read_data_file(path: str, root: Optional[str] = None) -> DataGroup:
    """All samples of one `.json` file, checked for shape and for a single kind."""
    full = _resolve(path, root)
    if not os.path.isfile(full):
        raise FinetuneDataError(f"no such data file: {full!r}")
    try:
        with open(full, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FinetuneDataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, list):
        raise FinetuneDataError(f"{path}: expected a JSON list of samples, got {type(raw).__name__}")
    if not raw:
        raise FinetuneDataError(f"{path}: the file has no samples")
    records = [_parse_record(r, path, i, root) for i, r in enumerate(raw)]
    kind = records[0].data_type
    for r in records:
        if r.data_type != kind:
            first = "has" if kind == MULTI else "has no"
            raise FinetuneDataError(
                f"{r.describe()}: {'has no' if r.data_type == TEXT else 'has an'} 'image' while the file's first "
                f"sample {first} one; one file holds one kind of sample (put text-only and image samples in "
                "separate files and list both in data.txt)")
    return DataGroup(path, kind, records)


def _resample(records: List[Record], number: Optional[str], given_num: bool, rng: random.Random,
              where: str) -> List[Record]:
    """make_supervised_data_module's per-file subsampling / upsampling, draw for draw."""
    if given_num:
        if number is None:
            raise FinetuneDataError(f"{where}: with given_num every line needs `<file> <number>` "
                                    "(the number times 1000 is the sample count)")
        num = int(float(number) * 1000)
        if len(records) > num:
            return rng.sample(records, num)
        return records + [rng.choice(records) for _ in range(num - len(records))]
    if number is None:
        return records
    ratio = float(number)
    new_len = int(len(records) * ratio)
    if ratio < 1:
        return rng.sample(records, new_len)
    if ratio > 1:
        return records + [rng.choice(records) for _ in range(new_len - len(records))]
    return records


def load_data(data_path: str, given_num: bool = False, rng: Optional[random.Random] = None,
              root: Optional[str] = None) -> List[DataGroup]:
    """The data groups of a `.json` file (one group) or a `data.txt` list, resampled as upstream."""
    rng = random.Random(0) if rng is None else rng
    if data_path.endswith("json"):
        # Upstream passes a .json list where its mixer expects a dict of files and fails; here it is the
        # one-file case of data.txt.
        return [read_data_file(data_path, root)]
    if not data_path.endswith("txt"):
        raise FinetuneDataError(f"data_path must name a .json file of samples or a .txt list of them, got {data_path!r}")
    full = _resolve(data_path, root)
    if not os.path.isfile(full):
        raise FinetuneDataError(f"no such data list: {full!r}")
    groups, seen = [], set()
    with open(full, encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{data_path} line {lineno}"
        if len(fields) > 2:
            raise FinetuneDataError(f"{where}: expected `<file.json> [number]`, got {line.strip()!r}")
        if fields[0] in seen:
            raise FinetuneDataError(f"{where}: {fields[0]} is listed twice (upstream would keep only the last)")
        seen.add(fields[0])
        number = fields[1] if len(fields) == 2 else None
        if number is not None:
            try:
                float(number)
            except ValueError:
                raise FinetuneDataError(f"{where}: {number!r} is not a number") from None
        group = read_data_file(fields[0], root)
        group.records = _resample(group.records, number, given_num, rng, where)
        if not group.records:
            raise FinetuneDataError(f"{where}: the number {number} selects no samples from {fields[0]}")
        groups.append(group)
    if not groups:
        raise FinetuneDataError(f"{data_path}: lists no data files")
    return groups
