"""The InternLM2 tokenizer on sentencepiece alone, with the ids and texts of upstream's slow tokenizer
(`tokenization_internlm2.InternLM2Tokenizer` loaded by `from_pretrained` under transformers 4.33).

What transformers adds on top of sentencepiece, reproduced here:
- the special tokens `<s>`, `</s>`, `<unk>` written in the text are cut out before sentencepiece sees the
  text, and the whitespace on both sides of each of them is stripped (4.33's default for special tokens);
- `add_special_tokens=True` prepends `<s>` (and appends `</s>` if `add_eos_token`);
- decoding decodes the runs between special tokens separately, puts a space before each run of special
  tokens and applies transformers' `clean_up_tokenization` (" ." -> "." etc.), as upstream's
  `convert_tokens_to_string` does.
`[UNUSED_TOKEN_145]` / `[UNUSED_TOKEN_146]` are user-defined pieces of the sentencepiece model itself.
"""
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm

from .constants import BUNDLED_TOKENIZER, TOKENIZER_FILE
from .errors import TokenizerLoadError, TokenizerNotFoundError
from .validation import check_text

logger = logging.getLogger(__name__)
BUNDLED_MODEL = BUNDLED_TOKENIZER  # the name tests and scripts know
VOCAB_FILE_NAME = TOKENIZER_FILE
CONFIG_FILE_NAME = "tokenizer_config.json"


class BatchEncoding(dict):
    """A dict whose keys are also attributes (`enc.input_ids`), like Hugging Face's BatchEncoding."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _clean_up_tokenization(text: str) -> str:
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))


def _token_content(value) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


class InternLM2Tokenizer:
    """`InternLM2Tokenizer.from_pretrained(dir)` reads `dir/tokenizer.model` (and the special tokens and
    `add_bos_token` / `add_eos_token` of `dir/tokenizer_config.json` if present);
    `from_pretrained()` or `from_pretrained(None)` uses the tokenizer bundled with this package."""

    def __init__(self, vocab_file: Optional[str] = None, unk_token: str = "<unk>", bos_token: str = "<s>",
                 eos_token: str = "</s>", pad_token: str = "</s>", add_bos_token: bool = True,
                 add_eos_token: bool = False):
        self.vocab_file = BUNDLED_MODEL if vocab_file is None else os.fspath(vocab_file)
        if not os.path.isfile(self.vocab_file):
            raise TokenizerNotFoundError(f"no sentencepiece model at {self.vocab_file!r}")
        self.sp_model = spm.SentencePieceProcessor()
        try:
            self.sp_model.Load(self.vocab_file)
        except (RuntimeError, OSError) as e:  # sentencepiece's only report of a corrupt or foreign file
            raise TokenizerLoadError(f"{self.vocab_file} is not a SentencePiece model "
                                     f"({str(e).strip().splitlines()[-1]})") from None
        self.unk_token, self.bos_token, self.eos_token, self.pad_token = unk_token, bos_token, eos_token, pad_token
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.padding_side = "right"
        # Longest first, so that a special token containing another one wins.
        self._no_split = sorted(set(self.all_special_tokens), key=len, reverse=True)

    @classmethod
    def from_pretrained(cls, path: Optional[Union[str, os.PathLike]] = None, **overrides) -> "InternLM2Tokenizer":
        if path is None:
            return cls(**overrides)
        path = os.fspath(path)
        if os.path.isfile(path):
            return cls(vocab_file=path, **overrides)
        vocab_file = os.path.join(path, VOCAB_FILE_NAME)
        if not os.path.isfile(vocab_file):
            raise TokenizerNotFoundError(f"no {VOCAB_FILE_NAME} in {path!r}")
        kwargs = {}
        config_file = os.path.join(path, CONFIG_FILE_NAME)
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise TokenizerLoadError(f"{config_file} is not valid JSON: {e}") from None
            if not isinstance(config, dict):
                raise TokenizerLoadError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
            for key in ("unk_token", "bos_token", "eos_token", "pad_token"):
                if config.get(key) is not None:
                    kwargs[key] = _token_content(config[key])
            for key in ("add_bos_token", "add_eos_token"):
                if key in config:
                    kwargs[key] = bool(config[key])
        kwargs.update(overrides)
        return cls(vocab_file=vocab_file, **kwargs)

    # -- vocabulary ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> int:
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self) -> int:
        return self.sp_model.eos_id()

    @property
    def unk_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.unk_token)

    @property
    def pad_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.pad_token)

    @property
    def all_special_tokens(self) -> List[str]:
        out = []
        for tok in (self.bos_token, self.eos_token, self.unk_token, self.pad_token):
            if tok not in out:
                out.append(tok)
        return out

    @property
    def all_special_ids(self) -> List[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def get_vocab(self) -> Dict[str, int]:
        return {self.sp_model.IdToPiece(i): i for i in range(self.vocab_size)}

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[int, List[int]]:
        if isinstance(tokens, str):
            return self.sp_model.piece_to_id(tokens)
        return [self.sp_model.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Iterable[int]], skip_special_tokens: bool = False):
        if isinstance(ids, (int, np.integer)):
            return self._piece(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._piece(int(i)) for i in ids if int(i) not in special]

    def _piece(self, index: int) -> str:
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"token id {index} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp_model.IdToPiece(index)

    # -- encoding -----------------------------------------------------------------------------------------
    def _split_special(self, text: str) -> List[str]:
        """Cut at the leftmost, then longest, special token, as transformers' trie does."""
        parts, start, i = [], 0, 0
        while i < len(text):
            match = next((t for t in self._no_split if text.startswith(t, i)), None)
            if match is None:
                i += 1
                continue
            if i > start:
                parts.append(text[start:i])
            parts.append(match)
            i += len(match)
            start = i
        if start < len(text):
            parts.append(text[start:])
        return parts

    def tokenize(self, text: str) -> List[str]:
        check_text(text, "text")  # sentencepiece cannot take bytes, None or lone surrogates
        parts = self._split_special(text)
        special = set(self._no_split)
        for i, part in enumerate(parts):
            if part in special:
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
                if i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
        tokens = []
        for part in parts:
            if not part:
                continue
            if part in special:
                tokens.append(part)
            else:
                tokens.extend(self.sp_model.encode(part, out_type=str))
        return tokens

    def build_inputs_with_special_tokens(self, ids: List[int]) -> List[int]:
        out = ([self.bos_token_id] if self.add_bos_token else []) + list(ids)
        return out + [self.eos_token_id] if self.add_eos_token else out

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(self, text: Union[str, Sequence[str]], add_special_tokens: bool = True,
                 return_tensors: Optional[str] = None, padding: Union[bool, str] = False,
                 return_attention_mask: bool = True) -> BatchEncoding:
        """`input_ids` (and `attention_mask`) of one text or a list of texts.

        return_tensors="np" gives int64 arrays [batch, length] (a single text becomes a batch of one);
        None gives lists. padding=True/"longest" pads a batch on the right with `pad_token_id`.
        """
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        if padding not in (False, True, "longest", "do_not_pad"):
            raise ValueError(f"padding must be False, True or 'longest', got {padding!r}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        mask = [[1] * len(x) for x in ids]
        if padding in (True, "longest") and ids:
            longest = max(len(x) for x in ids)
            mask = [m + [0] * (longest - len(m)) for m in mask]
            ids = [x + [self.pad_token_id] * (longest - len(x)) for x in ids]
        if return_tensors == "np":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("texts of different token lengths cannot form one array: pass padding='longest'")
            out = BatchEncoding(input_ids=np.asarray(ids, dtype=np.int64).reshape(len(ids), -1))
            if return_attention_mask:
                out["attention_mask"] = np.asarray(mask, dtype=np.int64).reshape(len(ids), -1)
            return out
        out = BatchEncoding(input_ids=ids[0] if single else ids)
        if return_attention_mask:
            out["attention_mask"] = mask[0] if single else mask
        return out

    # -- decoding -----------------------------------------------------------------------------------------
    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        special = set(self.all_special_tokens)
        out, run, prev_is_special = "", [], False
        for token in tokens:
            if token in special:
                if not prev_is_special:
                    out += " "
                out += self.sp_model.decode(run) + token
                prev_is_special, run = True, []
            else:
                run.append(token)
                prev_is_special = False
        return _clean_up_tokenization(out + self.sp_model.decode(run))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, np.ndarray):
            if ids.ndim > 1:
                raise ValueError(f"decode takes one sequence; use batch_decode for shape {ids.shape}")
            ids = ids.tolist()
        elif isinstance(ids, (int, np.integer)):
            ids = [int(ids)]
        return self.convert_tokens_to_string(self.convert_ids_to_tokens(ids, skip_special_tokens))

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> List[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]


def load_model_tokenizer(path: str) -> Optional[InternLM2Tokenizer]:
    """`model.tokenizer` of a model directory: its tokenizer.model, or None with a warning when there is none
    (upstream's model also starts without one; `chat` then says what is missing). A tokenizer.model that is
    not a SentencePiece model is a `TokenizerLoadError`."""
    if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        logger.warning("%s has no tokenizer.model: model.tokenizer is None, so chat and the write_* methods will "
                       "refuse to run until one is assigned", path)
        return None
    return InternLM2Tokenizer.from_pretrained(path)
