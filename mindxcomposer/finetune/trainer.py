"""The training loop of transformers 4.33's `Trainer.train()` as upstream's `finetune.py` runs it.

Step accounting, as the Trainer:
- an epoch is the worker's micro-batches (`FinetuneData.micro_batches_per_epoch`); an optimizer step
  follows every `gradient_accumulation_steps`-th micro-batch counted over the whole run (leftovers at
  the end of an epoch are accumulated with the next epoch's first micro-batches), or the last
  micro-batch of an epoch shorter than the accumulation;
- each micro-batch's loss is divided by `gradient_accumulation_steps` (also in a short step);
- `max_steps`, else `ceil(num_train_epochs * max(epoch // accumulation, 1))` optimizer steps; warmup
  `warmup_steps`, else `ceil(max_steps * warmup_ratio)`;
- logged every `logging_steps`: loss = the accumulated (loss / accumulation) since the last log over
  the optimizer steps since then, averaged over the workers (unrounded here; transformers rounds to 4
  digits), learning_rate after the scheduler's step, grad_norm before clipping (transformers 4.33 does
  not log it), epoch;
- a micro-batch without any target (its samples all cut by `max_length`) has upstream's NaN loss: zero gradients,
  and the Trainer's `logging_nan_inf_filter` (on by default) adds the mean logged loss so far instead of it;
- `--sampling sequential` restarts each epoch at the worker's first micro-batch (a map-style dataset);
  `--sampling upstream` is one stream over the whole run (upstream's dataset ignores the index).
"""
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..atomic import write_json
from ..configuration import InternLMXComposer2Config
from ..ops import kernels_enabled
from .backprop import MicroBatchGradients
from .checkpoints import STATE_FILE, load_checkpoint, save_checkpoint
from .data import DataArguments, FinetuneData
from .distributed import World
from .lora import init_adapter, load_adapter, save_adapter
from .model_dir import save_model_dir
from .optim import AdamW, clip_grad_norm, global_norm, lr_lambda
from .quantized_base import check_training
from .spill import choose_store
from .trainables import Trainables, full_trainables, lora_trainables
from .training_args import TrainingArguments, resolve_resume


logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    global_step: int
    log_history: List[dict]
    output_dir: str


class Progress:
    """One status line on stderr: step, loss, lr, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.start = time.time()
        self.tokens = 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step: int, entry: dict):
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {entry.get('loss', float('nan')):.4f} | lr "
                f"{entry.get('learning_rate', 0):.3e} | {self.tokens / max(elapsed, 1e-9):.0f} tok/s | "
                f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")


def load_model(args: TrainingArguments):
    from ..modeling_xcomposer2 import InternLMXComposer2ForCausalLM
    # --bf16: bf16 arithmetic on Ascend; on CPU, bf16 products (inputs rounded to bf16, fp32 sums; activations,
    # gradients and master weights fp32), the CPU's counterpart of upstream's bf16 training.
    compute = "bf16" if args.bf16 else None
    # Full fine-tuning updates fp32 master weights in place; a LoRA run keeps the base as stored.
    dtype = None if args.use_lora else "fp32"
    return InternLMXComposer2ForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype, compute_dtype=compute)


class Trainer:
    def __init__(self, args: TrainingArguments, data_args: DataArguments, model=None, world: Optional[World] = None,
                 data_root: Optional[str] = None, progress_stream=None):
        self.args, self.data_args = args, data_args
        # A quantized base trains only under LoRA: said before the model or the data is read.
        config = model.config if model is not None else InternLMXComposer2Config.from_pretrained(args.model_name_or_path)
        check_training(config.quantization, args.use_lora, args.model_name_or_path)
        self.world = world or World()
        self.resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        self.model = model if model is not None else load_model(args)
        # Every sample is checked here, before any training work.
        self.data = FinetuneData(data_args, self.model.tokenizer, self.world.size, self.world.rank, root=data_root)
        self.trainables = self._trainables()
        # Layer inputs written to disk go to a directory of their own inside output_dir (removed after each micro-batch).
        self.grads = MicroBatchGradients(self.model, self.trainables, args.plora_dropout, args.layer_inputs,
                                         args.output_dir)
        t = self.trainables
        # AdamW's two fp32 moments per trained value; in files inside output_dir when they are large (`spill`).
        moments = 8 * sum(int(np.prod(p.shape)) for p in t.params.values())
        on_disk = choose_store(args.optimizer_state, moments, "optimizer_state", args.output_dir) == "disk"
        self.optimizer = AdamW(t.params, args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon,
                               args.weight_decay, dict(zip(t.names, t.decay_mask())),
                               state_dir=args.output_dir if on_disk else None)
        self.shapes = {n: tuple(p.shape) for n, p in t.params.items()}
        self.progress_stream = progress_stream

    def _trainables(self) -> Trainables:
        a = self.args
        if not a.use_lora:
            return full_trainables(self.model, a.fix_vit, a.fix_sampler)
        settings = a.lora_settings()
        if a.lora_weight_path:
            saved, initial = load_adapter(a.lora_weight_path, self.model.config)  # names and shapes checked
            if (saved.r, saved.targets) != (settings.r, settings.targets):
                raise ValueError(f"--lora_weight_path {a.lora_weight_path}: adapter r={saved.r}, targets "
                                 f"{saved.target_modules}; this run asks r={settings.r}, {settings.target_modules}")
        else:
            initial = init_adapter(self.model.config, settings, self.data_args.seed)
        return lora_trainables(self.model, settings, initial)

    # ------------------------------------------------------------------ schedule
    def plan(self):
        a = self.args
        per_epoch = self.data.micro_batches_per_epoch
        if per_epoch < 1:
            raise ValueError(f"the data gives no micro-batch per worker: {self.data.num_samples} samples, "
                             f"batch_size {self.data_args.batch_size}, {self.world.size} worker(s)")
        updates_per_epoch = max(per_epoch // a.gradient_accumulation_steps, 1)
        if a.max_steps > 0:
            max_steps = a.max_steps
            epochs = max_steps // updates_per_epoch + int(max_steps % updates_per_epoch > 0)
        else:
            max_steps = math.ceil(a.num_train_epochs * updates_per_epoch)
            epochs = math.ceil(a.num_train_epochs)
        warmup = a.warmup_steps if a.warmup_steps > 0 else math.ceil(max_steps * a.warmup_ratio)
        return per_epoch, max_steps, epochs, warmup

    def _records(self, index: int):
        """The samples of this epoch's `index`-th micro-batch (sequential), or the stream's next."""
        if self.data_args.sampling == "sequential":
            return self.data.micro_batch_records(index)
        return next(self._stream)

    # ------------------------------------------------------------------ outputs
    def _state(self, log_history, global_step, epoch_float, max_steps, position):
        return {"best_metric": None, "best_model_checkpoint": None, "epoch": epoch_float, "eval_steps": 500,
                "global_step": global_step, "is_hyper_param_search": False, "is_local_process_zero": True,
                "is_world_process_zero": True, "log_history": log_history, "logging_steps": self.args.logging_steps,
                "max_steps": max_steps, "num_train_epochs": self.plan()[2], "save_steps": self.args.save_steps,
                "total_flos": 0, "trial_name": None, "trial_params": None, "mxc": position}

    def _save_checkpoint(self, log_history, global_step, epoch_float, max_steps, position):
        if not self.world.is_main:
            return
        save_checkpoint(self.args.output_dir, global_step, self.trainables.arrays(), self.trainables.lora,
                        self.optimizer.state_arrays(), self._state(log_history, global_step, epoch_float, max_steps,
                                                                 position),
                        self.args.model_name_or_path, self.args.save_total_limit)

    def _save_final(self, log_history, global_step, epoch_float, max_steps, position):
        if not self.world.is_main:
            return
        out = self.args.output_dir
        os.makedirs(out, exist_ok=True)
        if self.trainables.is_lora:  # written one tensor at a time
            save_adapter(os.path.join(out, ".adapter.tmp"), self.trainables.arrays(), self.trainables.lora,
                         self.args.model_name_or_path)
            tmp = os.path.join(out, ".adapter.tmp")
        else:
            tmp = save_model_dir(self.args.model_name_or_path, os.path.join(out, ".model.tmp"), self.trainables.numpy())
        # Each file is complete when it appears (rename); the weights' index, if any, comes last.
        names = sorted(os.listdir(tmp), key=lambda f: f.endswith(".index.json"))
        for f in names:
            os.replace(os.path.join(tmp, f), os.path.join(out, f))
        os.rmdir(tmp)
        write_json(os.path.join(out, STATE_FILE), self._state(log_history, global_step, epoch_float, max_steps, position))

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        # Weights stored in another dtype than the arithmetic (a bf16 checkpoint on CPU, LoRA): the gradient
        # cells run op by op, as inference's prefill does. A compiled block keeps the fp32 casts of all its
        # weights for the graph's lifetime: measured at the release's width, +2.2 GiB for a decoder layer's
        # forward graph and +2.0 GiB for its gradient graph, against +0.6 and +0.8 GiB op by op.
        # With the CPU kernels no cast exists (bf16 weights are read in place), so the cells compile.
        mode = ms.get_context("mode")
        op_by_op = self.model.dtype != self.model.compute_dtype and mode == ms.GRAPH_MODE and not kernels_enabled()
        if op_by_op:
            ms.set_context(mode=ms.PYNATIVE_MODE)
        try:
            return self._train()
        finally:
            if op_by_op:
                ms.set_context(mode=mode)

    def _train(self) -> TrainResult:
        a = self.args
        per_epoch, max_steps, epochs, warmup = self.plan()
        schedule = lr_lambda(a.lr_scheduler_type, warmup, max_steps, a.learning_rate)
        logging_steps = a.steps_value(a.logging_steps, max_steps)
        save_steps = a.steps_value(a.save_steps, max_steps)
        global_step, total_batched, start_epoch, skip, log_history = 0, 0, 0, 0, []
        last_logged, tr_loss, total_loss = 0, 0.0, 0.0
        if self.resume:
            trained, opt_state, state = load_checkpoint(self.resume, self.trainables.lora, self.model.config)
            self.trainables.assign(trained)
            self.optimizer.load_state_dict(opt_state)
            pos = state["mxc"]
            global_step, total_batched = state["global_step"], pos["total_batched"]
            start_epoch, skip = pos["epoch"], pos["index"]
            last_logged, tr_loss, total_loss = pos["last_logged"], pos["tr_loss"], pos["total_loss"]
            self.grads.rope_length = pos["rope_length"]
            log_history = state["log_history"]
        if self.data_args.sampling == "upstream":
            self._stream = self.data.iter_records(start=total_batched)
        progress = Progress(max_steps, bool(getattr(a, "progress", True)) and self.world.is_main, self.progress_stream)
        start = time.time()
        accum: Dict[str, Tensor] = {}
        stop = global_step >= max_steps
        epoch_float = float(start_epoch)
        for epoch in range(start_epoch, epochs):
            if stop:
                break
            first = skip if epoch == start_epoch else 0
            for index in range(first, per_epoch):
                records = self._records(index)
                batch = self.data.build(records)
                total_batched += 1
                # The dropout seed follows the global micro-batch number (1-based; this worker's is
                # (total_batched - 1) * size + rank + 1): N workers draw the masks one worker would.
                global_batch = (total_batched - 1) * self.world.size + self.world.rank + 1
                seed = float((self.data_args.seed * 7919 + global_batch) % 100003)
                loss, grads, _ = self.grads.loss_and_grads(batch, 1.0 / a.gradient_accumulation_steps, seed)
                progress.tokens += int(np.asarray(batch["attention_mask"]).sum())
                if math.isnan(loss):
                    # No target in the micro-batch (its samples all cut by max_length): upstream's loss is NaN and its
                    # gradients zeros; transformers' logging_nan_inf_filter adds the average of the losses so far.
                    logger.warning("micro-batch %d (%s) has no supervised token left after max_length=%d: upstream's "
                                   "loss is NaN there; its gradients are zeros and the logged loss skips it, as in "
                                   "upstream's run", total_batched, "; ".join(batch["samples"]),
                                   self.data_args.max_length)
                    tr_loss += tr_loss / (1 + global_step - last_logged)
                else:
                    tr_loss += loss
                for name, g in grads.items():
                    accum[name] = g if name not in accum else accum[name] + g
                # Only `accum` holds the gradients now: clipping replaces them one by one instead of doubling them
                # (0.56 GiB at the release's size with upstream's LoRA).
                del grads
                short_epoch_end = per_epoch <= a.gradient_accumulation_steps and index + 1 == per_epoch
                if not (total_batched % a.gradient_accumulation_steps == 0 or short_epoch_end):
                    continue
                # optimizer step: the parameters some micro-batch (of any worker) gave a gradient
                accum = self.world.average_grads(accum, self.trainables.names, self.shapes)
                grad_norm = clip_grad_norm(accum, a.max_grad_norm) if a.max_grad_norm and a.max_grad_norm > 0 \
                    else global_norm(list(accum.values()))  # logged even when nothing is clipped
                lr = a.learning_rate * schedule(global_step)
                self.optimizer.step(accum, lr)
                accum = {}
                global_step += 1
                epoch_float = epoch + (index + 1) / per_epoch
                position = {"epoch": epoch + (index + 1) // per_epoch, "index": (index + 1) % per_epoch,
                            "total_batched": total_batched, "rope_length": self.grads.rope_length}
                entry = None
                if global_step % logging_steps == 0:
                    [mean_loss] = self.world.mean_scalars([tr_loss])
                    entry = {"loss": mean_loss / (global_step - last_logged),
                             "learning_rate": a.learning_rate * schedule(global_step), "grad_norm": grad_norm,
                             "epoch": round(epoch_float, 2), "step": global_step}
                    log_history.append(entry)
                    total_loss += mean_loss
                    tr_loss, last_logged = 0.0, global_step
                progress.update(global_step, entry or {"learning_rate": lr})
                position.update(last_logged=last_logged, tr_loss=tr_loss, total_loss=total_loss)
                stop = global_step >= max_steps
                if a.save_strategy == "steps" and global_step % save_steps == 0:
                    self._save_checkpoint(log_history, global_step, epoch_float, max_steps, position)
                if stop:
                    break
            if a.save_strategy == "epoch" and not (stop and index + 1 < per_epoch):
                self._save_checkpoint(log_history, global_step, epoch_float, max_steps, position)
        progress.close()
        [rest] = self.world.mean_scalars([tr_loss])
        runtime = time.time() - start
        log_history.append({"epoch": round(epoch_float, 2), "step": global_step, "total_flos": 0,
                            "train_loss": (total_loss + rest) / max(global_step, 1),
                            "train_runtime": round(runtime, 4),
                            "train_samples_per_second": round(max_steps * a.gradient_accumulation_steps *
                                                              self.data_args.batch_size * self.world.size /
                                                              max(runtime, 1e-9), 3),
                            "train_steps_per_second": round(max_steps / max(runtime, 1e-9), 3)})
        self._save_final(log_history, global_step, epoch_float, max_steps,
                         {"epoch": epochs, "index": 0, "total_batched": total_batched,
                          "rope_length": self.grads.rope_length, "last_logged": last_logged, "tr_loss": tr_loss,
                          "total_loss": total_loss})
        return TrainResult(global_step, log_history, a.output_dir)
