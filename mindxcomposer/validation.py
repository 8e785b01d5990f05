"""Argument checks at the public boundary, run before any tensor is allocated or any graph compiled.

`chat`, `batch_chat`, `write_*`, `generate`, `interleav_wrap_chat`, `encode_img`, `from_pretrained` and the
command-line tools call these at their entry, so a bad argument is reported by name, with the value given
and what is accepted, instead of surfacing later from MindSpore, sentencepiece or a numpy reshape. Errors
are the classes of `mindxcomposer.errors` (subclasses of `ValueError` / `TypeError` / `OSError`).

Only cheap checks live here (types, ranges, existence of files); decoding an image, say, stays with the
code that uses it (`image_processing`), so each check has one implementation.
"""
import json
import math
import numbers
import os
import re
from typing import Any, Iterable, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from .constants import IMAGE_EXTENSIONS, TILE, TOKENIZER_FILE, VIDEO_EXTENSIONS
from .errors import (ArgumentTypeError, ConfigError, InputFileNotFoundError, InvalidArgumentError, InvalidTextError,
                     MissingTokenizerError, ModelNotFoundError, TokenizerNotFoundError, UnsupportedFormatError)

# Upstream's config.json always carries these; they fix every weight's shape, so a missing one would
# otherwise show up only as dozens of shape mismatches against the release defaults.
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads")
_SURROGATE = re.compile("[\ud800-\udfff]")


def describe(value: Any, limit: int = 60) -> str:
    """A short repr for error messages (long strings and lists are cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(value) -> str:
    return type(value).__name__


# ---------------------------------------------------------------------------------------------- scalars
def check_bool(value, name: str) -> bool:
    # Not `bool(value)`: the string "False" is truthy, and 0/1 are too easily a different argument.
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ArgumentTypeError(f"{name} must be True or False, got {describe(value)} ({_type_name(value)})")


def check_int(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None,
              allow_none: bool = False) -> Optional[int]:
    """An integer (numpy integers too; not bool, float or str) within [minimum, maximum]."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        accepted = "an integer" + (" or None" if allow_none else "")
        raise ArgumentTypeError(f"{name} must be {accepted}, got {describe(value)} ({_type_name(value)})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InvalidArgumentError(f"{name} must be an integer {_range(minimum, maximum)}, got {value}")
    return value


def check_float(value, name: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
                min_exclusive: bool = False, allow_none: bool = False) -> Optional[float]:
    """A finite real number (int or float, numpy too; not bool or str) within the range."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        accepted = "a number" + (" or None" if allow_none else "")
        raise ArgumentTypeError(f"{name} must be {accepted}, got {describe(value)} ({_type_name(value)})")
    value = float(value)
    low_bad = minimum is not None and (value <= minimum if min_exclusive else value < minimum)
    if not math.isfinite(value) or low_bad or (maximum is not None and value > maximum):
        raise InvalidArgumentError(f"{name} must be a finite number {_range(minimum, maximum, min_exclusive)}, "
                                   f"got {value!r}")
    return value


def _range(minimum, maximum, min_exclusive=False) -> str:
    low = None if minimum is None else (f"> {minimum}" if min_exclusive else f">= {minimum}")
    if low and maximum is not None:
        return f"{low} and <= {maximum}"
    return low or (f"<= {maximum}" if maximum is not None else "")


def check_seed(seed, name: str = "seed") -> Optional[int]:
    """None or -1 (upstream's "no seed"), or a non-negative integer."""
    if seed is None:
        return None
    seed = check_int(seed, name, minimum=-1, allow_none=True)
    return None if seed == -1 else seed


# ---------------------------------------------------------------------------------------------- text
def check_text(value, name: str) -> str:
    """A `str` that sentencepiece can encode: no `bytes` or None (which would be formatted into the prompt
    as `b'...'` / `None`), and no lone surrogates."""
    if not isinstance(value, str):
        hint = " (decode it first, e.g. value.decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
        raise ArgumentTypeError(f"{name} must be a str, got {describe(value)} ({_type_name(value)}){hint}")
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise InvalidTextError(
            f"{name} is not valid Unicode: it holds the lone surrogate {bad.group()!r} at character {bad.start()} "
            f"(bytes that were not UTF-8, decoded with errors='surrogateescape'); decode the input as UTF-8, "
            f"or with errors='replace'")
    return value


def check_history(history, name: str = "history") -> List[Tuple[str, str]]:
    """A list of (query, response) string pairs, as `chat` returns it."""
    if history is None:
        return []
    if isinstance(history, (str, bytes)) or not isinstance(history, (list, tuple)):
        raise ArgumentTypeError(f"{name} must be a list of (query, response) pairs, got {describe(history)} "
                                f"({_type_name(history)})")
    out = []
    for i, turn in enumerate(history):
        # A string of length 2 would unpack as a pair of characters: refuse every string explicitly.
        if isinstance(turn, (str, bytes)) or not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise ArgumentTypeError(f"{name}[{i}] must be a (query, response) pair of strings, got "
                                    f"{describe(turn)} ({_type_name(turn)})")
        out.append((check_text(turn[0], f"{name}[{i}][0]"), check_text(turn[1], f"{name}[{i}][1]")))
    return out


def check_token_ids(ids, vocab_size: int, name: str = "input_ids") -> np.ndarray:
    """Integer token ids [rows, length] (rows, length > 0) inside the vocabulary, as int64. A float or
    negative id would otherwise be truncated or wrapped silently, one past the vocabulary fail in Gather."""
    arr = np.asarray(ids.asnumpy() if hasattr(ids, "asnumpy") else ids)
    if arr.ndim != 2 or 0 in arr.shape or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgumentError(f"{name} must be integer ids [rows, length] with rows, length > 0, got "
                                   f"{arr.dtype} {arr.shape}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        raise InvalidArgumentError(f"{name} must lie in [0, {vocab_size}), got values from {low} to {high}")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------------------------- images
def check_media_path(path: Union[str, os.PathLike], extensions: Iterable[str]) -> Tuple[str, str]:
    """Return (path, lower-case extension) after checking that the file exists and has an accepted extension."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputFileNotFoundError(f"{path!r} is a directory, not an image or video file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise UnsupportedFormatError(
            f"unsupported file extension {ext or '(none)'!r} for {path!r}; accepted: {', '.join(sorted(extensions))}")
    if not os.path.isfile(path):
        raise InputFileNotFoundError(f"no such file: {path!r}")
    return path, ext


def check_image(value, name: str = "image"):
    """One image: a path (image or video file), a PIL image, or pixel values [1, 3, H, W]. Only the type and,
    for paths, the existence and extension are checked here; decoding is `image_processing`'s."""
    if isinstance(value, (str, os.PathLike)):
        check_media_path(value, IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
        return value
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray) or _is_tensor(value):
        shape, dtype = tuple(value.shape), str(value.dtype)
        floating = dtype.lower().startswith(("float", "bfloat"))  # numpy's and MindSpore's names
        # the layout `IXCImageProcessor` returns; a ViT tile is 560 pixels in every IXC2.5 model
        if (len(shape) != 4 or shape[:2] != (1, 3) or 0 in shape[2:] or shape[2] % TILE or shape[3] % TILE
                or not floating):
            raise InvalidArgumentError(f"{name}: pixel values must be float [1, 3, H, W] with H and W multiples of "
                                       f"{TILE} (what IXCImageProcessor returns), got {dtype} {shape}")
        return value
    raise ArgumentTypeError(f"{name} must be a file path, a PIL image or pixel values [1, 3, H, W], got "
                            f"{describe(value)} ({_type_name(value)})")


def check_images(images, name: str = "image") -> list:
    """A list (or tuple) of images; None means none. A single path or image is refused with a hint: upstream's
    `image` is a list, and a string would be taken apart character by character."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, bytes)) or not isinstance(images, (list, tuple)):
        raise ArgumentTypeError(f"{name} must be a list of images (paths, PIL images or pixel arrays), got "
                                f"{describe(images)} ({_type_name(images)}); for one image pass "
                                f"{name}=[{describe(images)}]")
    return [check_image(v, f"{name}[{i}]") for i, v in enumerate(images)]


def _is_tensor(value) -> bool:
    return type(value).__module__.startswith("mindspore") and hasattr(value, "asnumpy")


# ---------------------------------------------------------------------------------------------- decoding
def check_streamer(streamer, name: str = "streamer"):
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        raise ArgumentTypeError(f"{name} must have put() and end() methods (e.g. generation.TextStreamer), got "
                                f"{describe(streamer)} ({_type_name(streamer)})")
    return streamer


def check_decode_options(streamer=None, compiled=None, seed=None, stopping_criteria=(), logits_processor=()) -> None:
    """The options of `generate` that are not GenerationConfig fields."""
    check_streamer(streamer)
    if compiled is not None:
        check_bool(compiled, "compiled")
    check_seed(seed)
    for name, items in (("stopping_criteria", stopping_criteria), ("logits_processor", logits_processor)):
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
            raise ArgumentTypeError(f"{name} must be a list of callables, got {describe(items)} ({_type_name(items)})")
        for i, c in enumerate(items):
            if not callable(c):
                raise ArgumentTypeError(f"{name}[{i}] must be callable, got {describe(c)} ({_type_name(c)})")


def physical_memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def check_cache_size(config, rows: int, prompt_length: int, max_new_tokens: int, itemsize: int) -> None:
    """The static KV cache (keys and values of every layer for prompt + max_new_tokens positions) must fit in
    the machine's memory: `max_new_tokens=10**9` is refused here instead of failing inside MindSpore."""
    memory = physical_memory_bytes()
    if memory is None:
        return
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize * rows
    needed = per_position * (prompt_length + max_new_tokens)
    if needed > memory:
        fit = max(0, memory // per_position - prompt_length)
        raise InvalidArgumentError(
            f"max_new_tokens={max_new_tokens} with a {prompt_length}-token prompt in {rows} cache row(s) needs a "
            f"KV cache of {needed / 1e9:.1f} GB, more than this machine's {memory / 1e9:.1f} GB of memory; at most "
            f"{fit} new tokens fit")


def check_chat_inputs(query, image, history, hd_num, meta_instruction, use_meta=False,
                      query_name: str = "query") -> Tuple[str, list, List[Tuple[str, str]], int]:
    """The prompt arguments shared by `chat`, `batch_chat`, `write_*` and `interleav_wrap_chat`; returns them
    normalised (image and history as lists; None as an empty list)."""
    query = check_text(query, query_name)
    images = check_images(image)
    history = check_history(history)
    hd_num = check_int(hd_num, "hd_num", minimum=1)
    check_text(meta_instruction, "meta_instruction")
    check_bool(use_meta, "use_meta")
    return query, images, history, hd_num


def check_tokenizer(tokenizer, model, name: str = "tokenizer"):
    """A tokenizer argument (or `model.tokenizer`): None is the model directory's missing tokenizer.model."""
    if tokenizer is None:
        where = getattr(model, "name_or_path", None)
        source = f"its directory {where!r} has no tokenizer.model" if where else "the model has no tokenizer"
        raise MissingTokenizerError(
            f"{name} is None ({source}): copy the model's tokenizer.model into that directory and reload, or "
            f"set model.tokenizer = InternLM2Tokenizer.from_pretrained(path)")
    if not (callable(getattr(tokenizer, "decode", None)) and hasattr(tokenizer, "eos_token_id")):
        raise ArgumentTypeError(f"{name} must be an InternLM2Tokenizer, got {describe(tokenizer)} "
                                f"({_type_name(tokenizer)})")
    return tokenizer


def require_tokenizer(model):
    """`model.tokenizer`, which prompts with images are tokenized with, must be set."""
    return check_tokenizer(getattr(model, "tokenizer", None), model, "model.tokenizer")


def check_output_dir(output_dir, name: str = "output_dir"):
    """None (write nothing) or a directory that exists or can be created: its nearest existing ancestor
    must be a writable directory."""
    if output_dir is None:
        return None
    if not isinstance(output_dir, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a directory path or None, got {describe(output_dir)} "
                                f"({_type_name(output_dir)})")
    path = os.path.abspath(os.fspath(output_dir))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InvalidArgumentError(f"{name} {os.fspath(output_dir)!r} cannot be a directory: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{name} {os.fspath(output_dir)!r}: {probe!r} is not writable")
    return output_dir


# ---------------------------------------------------------------------------------------------- loading
def check_model_dir(path, dtype=None, need_tokenizer: bool = False, use_fused_attention=None) -> str:
    """`from_pretrained`'s arguments, and that the directory holds config.json (and tokenizer.model, if
    `need_tokenizer`), before any file is read."""
    if use_fused_attention is not None:
        check_bool(use_fused_attention, "use_fused_attention")
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a model directory (str or os.PathLike), got {describe(path)} "
                                f"({_type_name(path)})")
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise ModelNotFoundError(f"model directory {path!r} {what}")
    if dtype is not None:
        import mindspore as ms

        allowed = (ms.float32, ms.float16, ms.bfloat16)
        if dtype not in allowed:
            raise InvalidArgumentError(f"dtype must be one of mindspore.float32, float16, bfloat16, got "
                                       f"{describe(dtype)}")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ModelNotFoundError(f"no config.json in {path!r}: not an IXC2.5 model directory")
    if need_tokenizer and not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        raise TokenizerNotFoundError(f"no {TOKENIZER_FILE} in {path!r}: copy the model's tokenizer.model there")
    return path


def read_config_json(cfg_file: str) -> dict:
    """config.json as a dict, with the keys the weight shapes depend on present and positive integers."""
    try:
        with open(cfg_file, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object, got {_type_name(d)}")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in d]
    if missing:
        raise ConfigError(f"{cfg_file} has no {', '.join(missing)}: every IXC2.5 config.json names "
                          f"{', '.join(REQUIRED_CONFIG_KEYS)} (the release has hidden_size 4096)")
    for k in REQUIRED_CONFIG_KEYS:
        v = d[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{cfg_file}: {k} must be a positive integer, got {describe(v)}")
    return d
