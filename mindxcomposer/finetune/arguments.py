"""Upstream's data flags on an argparse parser, spelled and parsed as transformers' HfArgumentParser does
(`--given_num True`, `--given_num` alone, `--given_num false`), so upstream command lines work unchanged."""
import argparse
import dataclasses
from typing import Sequence

from .data import SAMPLING_MODES, DataArguments

_HELP = {
    "data_path": "a .json list of samples, or a .txt of `<file.json> [number]` lines",
    "given_num": "data.txt numbers are sample counts in thousands (else ratios)",
    "batch_size": "samples per micro-batch, all of one kind (image or text-only)",
    "resolution": "tile size; only 560 (upstream ignores the flag)",
    "hd_num": "at most this many 560-px tiles per image",
    "max_length": "sequences are cut here (image and text positions)",
    "seed": "seeds the data.txt resampling and, plus the worker's rank, upstream sampling",
    "sampling": f"one of {', '.join(SAMPLING_MODES)}",
}


def parse_bool(value) -> bool:
    """HfArgumentParser's `string_to_bool`."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"truthy value expected: got {value!r}, e.g. True or False")


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for field in dataclasses.fields(DataArguments):
        name = f"--{field.name}"
        if field.type in (bool, "bool"):
            parser.add_argument(name, type=parse_bool, nargs="?", const=True, default=field.default,
                                help=_HELP[field.name])
        elif field.name == "sampling":
            parser.add_argument(name, choices=SAMPLING_MODES, default=field.default, help=_HELP[field.name])
        else:
            kind = int if field.type in (int, "int") else str
            parser.add_argument(name, type=kind, default=field.default, help=_HELP[field.name])
    return parser


def data_arguments(namespace: argparse.Namespace) -> DataArguments:
    return DataArguments(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(DataArguments)})


def parse_data_arguments(argv: Sequence[str]) -> DataArguments:
    return data_arguments(add_data_arguments(argparse.ArgumentParser()).parse_args(argv))
