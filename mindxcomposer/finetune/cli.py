"""`mxc-finetune`: upstream's `finetune.py` command line (same flags), and `mxc-finetune merge`
(upstream's `merge_peft_adapter.py`: same flags).

    mxc-finetune --model_name_or_path ixc2d5-ms --data_path data.txt --given_num True --use_lora True \\
        --output_dir output/finetune_lora --batch_size 2 --per_device_train_batch_size 1 ...
    msrun --worker_num 2 --local_worker_num 2 --master_addr 127.0.0.1 --master_port 8118 --join True \\
        mxc-finetune ...                                  # data parallel
    mxc-finetune merge --adapter_model_name output/finetune_lora --base_model_name ixc2d5-ms \\
        --output_name ixc2d5-merged
"""
import argparse
import sys
from typing import Optional, Sequence

from ..cli_support import run_command


def merge_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mxc-finetune merge",
                                     description="Fold a LoRA adapter (peft layout) into a model directory.")
    parser.add_argument("--adapter_model_name", required=True, help="adapter directory (adapter_config.json + "
                        "adapter_model.safetensors)")
    parser.add_argument("--base_model_name", required=True, help="the model the adapter was trained on")
    parser.add_argument("--output_name", required=True, help="the merged model directory to write")
    args = parser.parse_args(list(argv))
    from .merge import merge
    out = merge(args.adapter_model_name, args.base_model_name, args.output_name)
    print(f"merged model written to {out}")
    return 0


def train_main(argv: Sequence[str]) -> int:
    import mindspore as ms
    from .training_args import parse_args
    targs, dargs = parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)  # the gradient cells compile, one graph per kind of block
    from .trainer import Trainer
    result = Trainer(targs, dargs).train()
    if result.log_history:
        last = result.log_history[-1]
        print(f"trained {result.global_step} steps, train_loss {last.get('train_loss', float('nan')):.4f}; "
              f"outputs in {result.output_dir}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `mxc-finetune` console script: one-line errors (`--debug` for the traceback), status 130 on
    Ctrl-C / SIGTERM; an interrupted run keeps its last complete checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] == "merge":
        return run_command("mxc-finetune merge", lambda: merge_main(argv[1:]), debug, whole_process=True)
    return run_command("mxc-finetune", lambda: train_main(argv), debug,
                       interrupted_note="; the last complete checkpoint-<step> in --output_dir can resume it",
                       whole_process=True)


if __name__ == "__main__":
    sys.exit(main())
