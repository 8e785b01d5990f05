"""Fine-tuning data as upstream's recipe feeds it: files, checks, sampling and micro-batches.

`FinetuneData(DataArguments(...), tokenizer)` reads the data files, checks every sample before any
work starts (images readable, markers matching images, a non-empty conversation; a warning for a sample
whose supervised tokens `max_length` all cuts, which upstream trains on without a target), and yields
micro-batches of `batch_size` samples of one kind.

A micro-batch (`MicroBatch`, a dict) holds:
  data_type       "multi" or "text" (upstream's names)
  input_ids       int64 [B, L]; -100 where an image goes, the pad token after the end of a sample
  attention_mask  int64 [B, L]
  labels          int64 [B, L]; -100 where there is no loss
  im_mask         bool  [B, L]; True on image positions
  image_spans     int64 [n, 3]: (row, start, length kept) of each image with positions left
  pixel_values    list of n float32 [1, 3, H, W], in image_spans order (upstream's training transform)
  samples         the samples' descriptions ('file sample #i (id x)'), row by row

Deviation from upstream: its collator keeps only the first text of each text-only item (a micro-batch of
`batch_size` texts trains on one of them); here every text of the micro-batch is used, as for images.
"""
import logging
import math
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..prompt import IMAGE_MARKER
from ..image_processing import TILE
from .conversation import conv2text, count_markers
from .errors import FinetuneDataError
from .images import DEFAULT_HD_NUM, check_hd_num, image_size, image_token_count, training_pixel_values
from .labels import IGNORE_INDEX
from .records import MULTI, TEXT, DataGroup, Record, load_data
from .sampling import SequentialSampler, UpstreamMixSampler
from .sequences import collate_multimodal, collate_text, encode_multimodal, encode_text, special_ids

SAMPLING_MODES = ("upstream", "sequential")
logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    """Upstream's DataArguments (finetune.py), with its defaults, plus what the data needs from the
    training arguments (`max_length`, `seed`; upstream's defaults 8192 and 42) and `sampling`."""
    data_path: str = "data.txt"
    given_num: bool = False
    batch_size: int = 4
    resolution: int = 560
    hd_num: int = DEFAULT_HD_NUM
    max_length: int = 8192
    seed: int = 42
    sampling: str = "upstream"

    def check(self):
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.resolution != TILE:
            raise ValueError(f"resolution must be {TILE}: the vision tower works on {TILE}-pixel tiles "
                             f"(upstream ignores the flag), got {self.resolution!r}")
        check_hd_num(self.hd_num)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")


class MicroBatch(dict):
    """A dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class FinetuneData:
    """The data of one worker (`rank` of `world_size`): groups (one per data file, after resampling),
    every sample checked on construction, micro-batches by `iter_records` / `build` or by iterating."""

    def __init__(self, args: DataArguments, tokenizer, world_size: int = 1, rank: int = 0,
                 root: Optional[str] = None):
        args.check()
        self.args = args
        self.tokenizer = tokenizer
        self.world_size, self.rank = world_size, rank
        self.groups: List[DataGroup] = load_data(args.data_path, args.given_num, random.Random(args.seed), root)
        self._sizes: Dict[str, Tuple[int, int]] = {}
        self.samples_without_target: List[str] = []  # warned about: cut by max_length, or without an answer
        self._check_samples()
        if args.sampling == "sequential":
            self.sampler = SequentialSampler(self.groups, args.batch_size, world_size, rank)
        else:
            # Built here only to check its arguments; iteration makes a fresh one.
            self.sampler = UpstreamMixSampler(self.groups, args.batch_size, args.seed, world_size, rank)

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(len(g.records) for g in self.groups)

    @property
    def micro_batches_per_epoch(self) -> int:
        """Per worker: upstream's dataset length int(N / batch_size), split over the workers as torch's
        DistributedSampler does (rounded up)."""
        return math.ceil((self.num_samples // self.args.batch_size) / self.world_size)

    # -- checks --------------------------------------------------------------------------------------
    def _token_counts(self, record: Record) -> List[int]:
        counts = []
        for path in record.images:
            if path not in self._sizes:
                try:
                    self._sizes[path] = image_size(path)
                except InputError as e:
                    raise FinetuneDataError(f"{record.describe()}: {e}") from e
            try:
                counts.append(image_token_count(*self._sizes[path], self.args.hd_num))
            except InputError as e:
                raise FinetuneDataError(f"{record.describe()}: image {path!r}: {e}") from e
        return counts

    def _labels(self, record: Record, max_length: int) -> np.ndarray:
        text = conv2text([{"from": f, "value": v} for f, v in record.conversations])
        if record.data_type == MULTI:
            return encode_multimodal(text, self._token_counts(record), self.tokenizer, max_length).labels[:max_length]
        return collate_text([encode_text(text, self.tokenizer, max_length)], self.tokenizer)["labels"][0]

    def _check_samples(self):
        seen = set()
        for group in self.groups:
            for record in group.records:
                key = (record.source, record.index)
                if key in seen:  # upsampled repeats
                    continue
                seen.add(key)
                self._check_sample(record)

    def _check_sample(self, record: Record):
        text = conv2text([{"from": f, "value": v} for f, v in record.conversations])
        markers = count_markers(text)
        images = len(record.images or ())
        if markers != images and not (images == 1 and markers == 0):
            raise FinetuneDataError(
                f"{record.describe()}: {markers} {IMAGE_MARKER} marker(s) but {images} image(s); put one marker "
                "where each image goes (a single image without a marker goes first)")
        # Position 0's label is never a target (the loss compares logits t with labels t + 1), yet upstream
        # leaves `<s>` labelled there when a sample is cut inside its first question: skip it.
        if np.any(self._labels(record, self.args.max_length)[1:] != IGNORE_INDEX):
            return
        # Upstream trains on such a sample: a micro-batch's loss is the mean over the targets its samples keep,
        # so this one contributes nothing (and a micro-batch of such samples only has zero gradients).
        full = self._labels(record, 2 ** 62)
        targets = np.nonzero(full[1:] != IGNORE_INDEX)[0]
        if targets.size:
            first = int(targets[0]) + 1
            logger.warning("%s: max_length=%d cuts every supervised token: the sample is %d positions long and its "
                           "first supervised token is at position %d (max_length >= %d keeps it); it contributes "
                           "nothing to the loss, as in upstream's training", record.describe(),
                           self.args.max_length, len(full), first, first + 1)
        else:
            logger.warning("%s: no supervised token: the conversation has no answer (a turn whose 'from' is not "
                           "human/user), or a '</s>' in its text ends it before one; it contributes nothing to the "
                           "loss, as in upstream's training", record.describe())
        self.samples_without_target.append(record.describe())

    # -- micro-batches -------------------------------------------------------------------------------
    def build(self, records: Sequence[Record]) -> MicroBatch:
        """The micro-batch of these samples (all of one kind), in this order."""
        return build_micro_batch(records, self.tokenizer, self.args.max_length, self.args.hd_num,
                                 token_counts=self._token_counts)

    def micro_batch_records(self, j: int) -> List[Record]:
        """Sequential sampling: the samples of this worker's j-th micro-batch."""
        if not isinstance(self.sampler, SequentialSampler):
            raise ValueError("micro_batch_records(j) needs sampling='sequential'; upstream sampling is a stream")
        return [self.groups[g].records[r] for g, r in self.sampler.micro_batch(j)]

    def iter_records(self, start: int = 0) -> Iterator[List[Record]]:
        """This worker's micro-batches' samples, endlessly, from its `start`-th micro-batch on (the draws
        before it are replayed without loading anything, for resuming)."""
        if isinstance(self.sampler, SequentialSampler):
            j = start
            while True:
                yield self.micro_batch_records(j)
                j += 1
        sampler = UpstreamMixSampler(self.groups, self.args.batch_size, self.args.seed, self.world_size, self.rank)
        for _ in range(start):
            next(sampler)
        for group, picks in sampler:
            yield [self.groups[group].records[i] for i in picks]

    def __iter__(self) -> Iterator[MicroBatch]:
        for records in self.iter_records():
            yield self.build(records)


def build_micro_batch(records: Sequence[Record], tokenizer, max_length: int, hd_num: int = DEFAULT_HD_NUM,
                      token_counts=None) -> MicroBatch:
    """The micro-batch of these samples (all of one kind), in this order, without the sample checks of
    `FinetuneData` (so a sample may end up with no supervised token, as upstream allows).
    `token_counts(record)` gives the image token counts of a sample (default: from its image headers)."""
    kinds = {r.data_type for r in records}
    if len(kinds) != 1:
        raise FinetuneDataError(f"a micro-batch must hold one kind of sample, got {sorted(kinds)}")
    texts = [conv2text([{"from": f, "value": v} for f, v in r.conversations]) for r in records]
    if kinds == {TEXT}:
        batch = collate_text([encode_text(t, tokenizer, max_length) for t in texts], tokenizer)
        pixel_values = []
    else:
        if token_counts is None:
            def token_counts(record):
                return [image_token_count(*image_size(p), hd_num) for p in record.images]
        encoded = [encode_multimodal(t, token_counts(r), tokenizer, max_length) for r, t in zip(records, texts)]
        batch = collate_multimodal(encoded, special_ids(tokenizer)[2], max_length)
        rows = batch["image_spans"][:, 0].tolist()
        pixel_values = []
        for row, record in enumerate(records):
            for path in record.images[:rows.count(row)]:  # the images left are the first ones of the row
                try:
                    pixel_values.append(training_pixel_values(path, hd_num))
                except InputError as e:
                    raise FinetuneDataError(f"{record.describe()}: {e}") from e
    return MicroBatch(data_type=kinds.pop(), pixel_values=pixel_values, samples=[r.describe() for r in records],
                      **batch)
