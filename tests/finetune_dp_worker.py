"""`mxc-finetune` as msrun runs it in each process, for tests/test_finetune_distributed.py, with two
test-only additions that let the test see every worker: each worker writes under its own
`<--output_dir>/rank<r>` (rank 0's is the run's output; another rank's must stay absent, as only rank 0
writes), and each saves its final trained tensors to `<dump>/rank<r>.npz`.

    msrun ... python tests/finetune_dp_worker.py <dump> <mxc-finetune flags>
"""
import os
import sys

import numpy as np

from mindxcomposer.finetune import cli
from mindxcomposer.finetune.trainer import Trainer


def main():
    dump, argv = sys.argv[1], sys.argv[2:]
    train = Trainer.train

    def train_and_dump(self):
        self.args.output_dir = os.path.join(self.args.output_dir, f"rank{self.world.rank}")
        result = train(self)
        os.makedirs(dump, exist_ok=True)
        np.savez(os.path.join(dump, f"rank{self.world.rank}.npz"), **self.trainables.numpy())
        return result

    Trainer.train = train_and_dump
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
