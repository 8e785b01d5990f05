"""Golden learning-rate sequences of transformers 4.33.2's `get_scheduler` (LambdaLR over torch AdamW), for every
schedule mxc-finetune offers: tests/fixtures/finetune_train/schedules.json.

    /work/venv-ref/bin/python tools/reference/make_schedule_fixtures.py

Each entry: the schedule, warmup steps, training steps, base learning rate, and `get_last_lr()` before each
optimizer step and after the last (what the Trainer logs is the value after a step's scheduler step).
"""
import json
import os

import torch
import transformers
from transformers.optimization import get_scheduler

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "tests", "fixtures", "finetune_train", "schedules.json")
KINDS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
SHAPES = [(0, 7, 1e-3), (2, 7, 1e-3), (3, 3, 5e-5), (1, 10, 2e-4), (5, 40, 3e-4), (40, 50, 1e-5)]


def main():
    cases = []
    for kind in KINDS:
        for warmup, total, lr in SHAPES:
            if (kind == "inverse_sqrt" and warmup == 0) or (kind == "polynomial" and total == warmup):
                continue  # transformers divides by zero there
            p = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.AdamW([p], lr=lr)
            sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total)
            lrs = []
            for _ in range(total + 1):
                lrs.append(sched.get_last_lr()[0])
                opt.step()
                sched.step()
            cases.append({"kind": kind, "warmup": warmup, "total": total, "lr": lr, "lrs": lrs})
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}, f)
    print(f"{len(cases)} schedules -> {OUT}")


if __name__ == "__main__":
    main()
