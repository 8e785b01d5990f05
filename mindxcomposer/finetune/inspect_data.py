"""Check fine-tuning data and show the first micro-batches, without a model:

    python -m mindxcomposer.finetune.inspect_data --data_path data.txt --given_num True --batch_size 2 \
        --max_length 16384 --show 4

Takes upstream's data flags (`mindxcomposer.finetune.arguments`). Every sample is checked first (the
errors name the sample); then, per micro-batch: kind, samples, length, supervised tokens per row, images.
"""
import argparse
import sys
from typing import Optional, Sequence

from ..tokenization_internlm2 import InternLM2Tokenizer
from .arguments import add_data_arguments, data_arguments
from .data import FinetuneData
from .errors import FinetuneDataError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_data_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--tokenizer", default=None,
                        help="a model directory or tokenizer.model (default: the bundled InternLM2 tokenizer)")
    parser.add_argument("--show", type=int, default=3, help="micro-batches to show")
    parser.add_argument("--world_size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        data = FinetuneData(data_arguments(args), InternLM2Tokenizer.from_pretrained(args.tokenizer),
                            world_size=args.world_size, rank=args.rank)
    except (FinetuneDataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for group in data.groups:
        print(f"{group.source}: {len(group.records)} {group.data_type} samples")
    print(f"{data.num_samples} samples, {data.micro_batches_per_epoch} micro-batches of {args.batch_size} per "
          f"epoch on worker {args.rank} of {args.world_size}; every sample checked")
    stream = data.iter_records()
    for j in range(args.show):
        batch = data.build(next(stream))
        supervised = (batch["labels"][:, 1:] != -100).sum(axis=1).tolist()
        print(f"micro-batch {j}: {batch['data_type']}, length {batch['input_ids'].shape[1]}, "
              f"supervised {supervised}, images {len(batch['pixel_values'])}")
        for name in batch["samples"]:
            print(f"    {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
