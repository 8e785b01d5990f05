"""`mxc-finetune`'s arguments: upstream's `finetune.py` flags (its ModelArguments, DataArguments,
TrainingArguments and LoraArguments), spelled, defaulted and parsed as transformers 4.33's
HfArgumentParser does, so that upstream's `finetune.sh` / `finetune_lora.sh` command lines run with the
command name changed. Flags of transformers' TrainingArguments that do not change training here are
accepted and ignored (listed in `IGNORED`); flags that would change it but are not supported are errors.
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .arguments import add_data_arguments, data_arguments, parse_bool
from .spill import check_store
from .lora import DEFAULT_TARGETS, LoraSettings
from .optim import SCHEDULES

SAVE_STRATEGIES = ("no", "steps", "epoch")

# transformers flags upstream's scripts pass that have no effect on this trainer (value ignored).
IGNORED = ("per_device_eval_batch_size", "evaluation_strategy", "report_to", "deepspeed", "cache_dir",
           "local_rank", "logging_dir", "dataloader_num_workers", "remove_unused_columns", "tf32",
           "overwrite_output_dir", "do_train", "ddp_find_unused_parameters", "label_names", "run_name",
           "disable_tqdm", "save_safetensors", "logging_strategy")


@dataclass
class TrainingArguments:
    """What trains and how: transformers' defaults, upstream's where it overrides them."""
    model_name_or_path: str = ""
    output_dir: str = ""
    # upstream's TrainingArguments / LoraArguments additions
    use_lora: bool = False
    fix_vit: bool = True
    fix_sampler: bool = False
    lora_r: int = 64
    lora_alpha: float = 64
    lora_dropout: float = 0.05
    lora_target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_weight_path: str = ""
    lora_bias: str = "none"
    plora_dropout: float = 0.05
    optim: str = "adamw_torch"
    # transformers 4.33 TrainingArguments
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    logging_steps: float = 500
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    # this project's: where the decoder layers' inputs wait for the backward, and where AdamW's moments live
    # (`finetune.spill`): auto, memory or disk
    layer_inputs: str = "auto"
    optimizer_state: str = "auto"

    def check(self):
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required (a model directory, e.g. from mxc-convert)")
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if self.optim != "adamw_torch":
            raise ValueError(f"optim {self.optim!r} is not supported: upstream's recipe uses adamw_torch")
        if self.per_device_train_batch_size != 1:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size}: only 1 is supported (upstream's "
                "scripts use 1; above 1 upstream trains only the first item of an image batch). Put more samples "
                "in a micro-batch with --batch_size")
        for name in ("layer_inputs", "optimizer_state"):
            check_store(getattr(self, name), name)
        if self.fp16:
            raise ValueError("--fp16 is not supported; use --bf16 (Ascend) or fp32")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if self.lr_scheduler_type == "polynomial" and not self.learning_rate > 1e-7:
            raise ValueError("lr_scheduler_type polynomial decays to 1e-7: learning_rate must be above it")
        if self.lr_scheduler_type == "inverse_sqrt" and self.warmup_steps <= 0 and self.warmup_ratio <= 0:
            raise ValueError("lr_scheduler_type inverse_sqrt needs --warmup_steps or --warmup_ratio (its timescale)")
        if self.save_strategy not in SAVE_STRATEGIES:
            raise ValueError(f"save_strategy must be one of {SAVE_STRATEGIES}, got {self.save_strategy!r}")
        for name in ("gradient_accumulation_steps",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("give --max_steps > 0 or --num_train_epochs > 0")
        if not 0 <= self.plora_dropout < 1:
            raise ValueError(f"plora_dropout must be in [0, 1), got {self.plora_dropout}")
        if self.learning_rate < 0 or self.weight_decay < 0 or not 0 <= self.warmup_ratio <= 1:
            raise ValueError("learning_rate and weight_decay must be >= 0 and warmup_ratio in [0, 1]")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("adam betas must be in [0, 1)")
        if self.lora_weight_path and not self.use_lora:
            raise ValueError("--lora_weight_path needs --use_lora True")
        if self.use_lora:
            self.lora_settings()  # checks r, dropout, targets

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=list(self.lora_target_modules), bias=self.lora_bias)

    def steps_value(self, value: float, total: int) -> int:
        """transformers: logging/save steps below 1 are a ratio of the total steps."""
        return max(1, int(value * total + 0.999999)) if value < 1 else int(value)


def build_parser(prog="mxc-finetune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune IXC2.5 as upstream's finetune.py does (same flags). "
        "`mxc-finetune merge --help`: fold a LoRA adapter into a model.")
    add_data_arguments(parser)
    for f in dataclasses.fields(TrainingArguments):
        name = f"--{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in (bool, "bool"):
            parser.add_argument(name, type=parse_bool, nargs="?", const=True, default=default)
        elif f.name == "lora_target_modules":
            parser.add_argument(name, nargs="+", default=default)
        elif f.type in (int, "int"):
            parser.add_argument(name, type=int, default=default)
        elif f.type in (float, "float"):
            parser.add_argument(name, type=float, default=default)
        elif f.name == "save_total_limit":
            parser.add_argument(name, type=int, default=None)
        else:
            parser.add_argument(name, type=str, default=default)
    for name in IGNORED:
        parser.add_argument(f"--{name}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=parse_bool, nargs="?", const=True, default=True,
                        help="show a progress bar on stderr (rank 0)")
    return parser


def parse_args(argv: Sequence[str]):
    """argv -> (TrainingArguments, DataArguments), both checked."""
    ns = build_parser().parse_args(list(argv))
    data = data_arguments(ns)
    targs = TrainingArguments(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainingArguments)})
    data.check()
    if not os.path.isfile(data.data_path):
        raise FileNotFoundError(f"--data_path {data.data_path}: no such file")
    targs.check()
    if targs.lora_weight_path and not os.path.isdir(targs.lora_weight_path):
        raise FileNotFoundError(f"--lora_weight_path {targs.lora_weight_path}: no such adapter directory")
    from ..validation import check_model_dir
    check_model_dir(targs.model_name_or_path)
    targs.progress = ns.progress
    if targs.resume_from_checkpoint in ("False", "false", "None", ""):
        targs.resume_from_checkpoint = None
    return targs, data


def resolve_resume(path: Optional[str], output_dir: str) -> Optional[str]:
    """`--resume_from_checkpoint True` means the latest checkpoint in output_dir, as transformers."""
    if path is None:
        return None
    if path in ("True", "true"):
        from .checkpoints import latest_checkpoint
        found = latest_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint True: no checkpoint-<step> directory in {output_dir}")
        return found
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {path}: not a directory")
    return path
