"""Golden training runs of upstream's `finetune/finetune.py` on the tiny model: tests/fixtures/finetune_train/.

    python tools/reference/make_finetune_train_fixtures.py --finetune /path/to/InternLM-XComposer/finetune \
        --upstream /path/to/InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/base [--case NAME ...]

Needs torch, torchvision, transformers 4.33.2, peft 0.8.2 and accelerate 0.27.2 (see README.md here). The working
directory becomes the repository root: data files and images are opened by paths relative to it, as upstream does.

Each case runs upstream's own `finetune.train()` (argument parsing into upstream's dataclasses, fix_vit / fix_sampler,
LoRA setup with `get_peft_model`, `make_supervised_data_module`, transformers' `Trainer`, `trainer.train()`,
`save_state`, `safe_save_model_for_hf_trainer`) with `sys.argv` set to the case's flags plus `--model_name_or_path`
and `--output_dir` (a temporary folder). Upstream files are imported at run time, never copied.

Run-time adaptations (upstream files untouched; every one is a monkeypatch made here):
- Model: `transformers.AutoConfig / AutoModelForCausalLM / AutoTokenizer.from_pretrained` return the upstream
  model that `upstream.py` builds for `mindxcomposer.demo.tiny_config(**config_overrides)` with
  `random_weights(config, seed)` (eager attention, float32, CPU), its config object and its tokenizer (padding side
  right, as finetune.py asks). `from_pretrained` would set `model.max_length` from the config finetune.py passes
  (`config.max_length = --max_length`, `config.use_cache = False`); the stand-in does the same on the same object.
- Dropout: upstream's PLoRA hard-codes `lora_dropout=0.05`; its `lora_dropout` module is replaced by `nn.Identity`
  (what `--plora_dropout 0` means for our trainer). peft's LoRA dropout is 0 through the case's `--lora_dropout 0`.
  The script fails if any `nn.Dropout` with p > 0 remains in the trained model.
- `torch.Tensor.cuda` is a no-op: the model's text-only branch calls `.cuda()`.
- deepspeed is not installed: empty stand-in modules while finetune.py is imported
  (`make_finetune_data_fixtures.import_finetune`). No `--deepspeed` flag is passed, so the Trainer clips with
  `accelerator.clip_grad_norm_` (torch's `clip_grad_norm_`) and steps torch's AdamW (`--optim adamw_torch`).
- Data (`--sampling sequential` of our trainer): finetune.py's `Mix_dataset` is replaced by `SequentialMix`: the
  data.txt files one after another, micro-batch k (the dataset's item k) holds samples (k*B ... k*B+B-1) mod N, B =
  --batch_size; length int(N / B) as Mix_dataset's. Each item is built by upstream's own
  `Sample_dataset.get_item()` of that file (conv2text, ImageProcessorHD training transform, the same dict as
  Mix_dataset items), its `random.randrange(n)` sample draws answered with those indices. A micro-batch must lie
  in one file (each file's sample count a multiple of B). `Trainer._get_train_sampler` returns torch's
  `SequentialSampler`, so the Trainer asks items 0, 1, 2, ... every epoch.
- Collator: upstream's `DataCollatorForSupervisedDataset` keeps only the first text of a text-only item (a bug our
  port fixes); here it keeps them all (image items are collated by upstream's code unchanged).
- LoRA cases start from a given adapter (non-zero A and B, seeded numpy, `--lora_weight_path` for our trainer):
  finetune.py's `get_peft_model` is wrapped to load it (peft's `set_peft_model_state_dict`) right after creating
  the adapter.
- Logging: the Trainer rounds the logged loss to 4 digits and 4.33 does not log the gradient norm. `Trainer.log`
  is wrapped to put the unrounded loss (the value `_maybe_log_save_evaluate` divides, read where it is gathered)
  and the total norm returned by `accelerator.clip_grad_norm_` of that step into the entry. The Trainer then
  appends it to `state.log_history` as usual; `trainer.save_state()` writes trainer_state.json, copied here.
  The patches go on the `transformers` module object finetune.py holds (a run can leave a different object in
  `sys.modules`).

Besides the Trainer's state, each case records (cases.json): the trainable names, the no-decay group, AdamW's
per-parameter step counts, per optimizer step the trainable parameters whose grad was None and the micro-batches
it ran, each micro-batch's item, samples, [B, L] and unscaled loss, and the tensor names upstream's
`safe_save_model_for_hf_trainer` wrote. It asserts >= 3 steps, clipping active on one (grad_norm > max_grad_norm),
and logged loss = sum of the step's micro-batch losses / gradient_accumulation_steps. Prints seconds per case.
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

# No hub: set before peft / transformers import huggingface_hub (upstream.py sets them too, later).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT_REL = "tests/fixtures/finetune_train"
DATA_REL = f"{OUT_REL}/data"
BIG = ("model.tok_embeddings.weight", "output.weight")  # [vocab, hidden]: rows only
RANDOM_ROWS = 64
ADAPTER_SCALE = 0.05

# ---------------------------------------------------------------------------------------------------------
# Data (written by this script, so the whole fixture folder is reproducible from it)


def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "bot", "value": v} for i, v in enumerate(turns)]


# A question that, after a 841-position image, pushes every answer beyond --max_length 900.
LONG_QUESTION = " ".join(["Look at every detail of the picture, one region after another."] * 8)

DATA_FILES = {
    "lora_image.json": [
        dict(id="i0", image="tests/assets/chelsea.png",
             conversations=_conv("What animal is in the picture?", "A tabby cat lying down.")),
        dict(id="i1", image=["tests/assets/rocket_portrait.png", "tests/assets/coffee_strip_1x8.png"],
             conversations=_conv("Image1: <ImageHere>; Image2: <ImageHere>. Compare the two images.",
                                 "The first shows a rocket, the second a cup of coffee.")),
        dict(id="i2", image=["tests/assets/coffee.png"],
             conversations=[{"from": "user", "value": "Look: <ImageHere>\nWhat drink is this?"},
                            {"from": "gpt", "value": "  A cup of coffee with latte art.  "},
                            {"from": "Human", "value": "Is it hot?"},
                            {"from": "assistant", "value": "It looks freshly made, so probably yes."}]),
        dict(id="i3", image="tests/assets/astronaut.png",
             conversations=_conv("<ImageHere>\nWho is this?", "An astronaut in a white suit.",
                                 "What is behind?", "A flag and the sky.")),
        dict(id="i4", image="tests/assets/rocket_strip_8x1.png",
             conversations=_conv("What is shown here? <ImageHere>", "A thin vertical strip of a rocket launch.",
                                 "你能用中文描述吗？", "这是一枚火箭发射的细长图片。")),
        dict(id="i5", image=["tests/assets/chelsea_tiny.png"],
             conversations=_conv("Is this picture large?", "No, it is a tiny picture of a cat.")),
        dict(id="i6", image="tests/assets/coffee_strip_1x8.png",
             conversations=_conv("Describe <ImageHere> in one word.", "Coffee.")),
        dict(id="i7", image="tests/assets/rocket_portrait.png",
             conversations=_conv("<ImageHere>What is about to happen?", "The rocket is about to launch.")),
    ],
    "mixed_images.json": [
        dict(id="mi0", image="tests/assets/coffee_strip_1x8.png",
             conversations=_conv("What is in this strip?", "A coffee cup seen from the side.")),
        dict(id="mi1", image=["tests/assets/chelsea_tiny.png"],
             conversations=_conv("<ImageHere>\nDescribe it in three words.", "Small grey cat.")),
    ],
    "text4.json": [
        dict(id="t0", conversations=_conv("What is the capital of France?", "Paris.")),
        dict(id="t1", conversations=[{"from": "user", "value": "  Write a haiku about rain. "},
                                     {"from": "assistant", "value": "Soft rain on the roof\nthe garden drinks in "
                                                                    "silence\nclouds drift toward the hills"},
                                     {"from": "Human", "value": "Now one about snow."},
                                     {"from": "gpt", "value": "White hush on the fields\nfootprints fill before "
                                                              "morning\nthe world holds its breath"}]),
        dict(id="t2", conversations=_conv("请用一句话介绍上海。", "上海是中国最大的城市之一，也是重要的经济中心。")),
        dict(id="t3", conversations=_conv("Say hi.", "Hi!", "And bye?", "Bye!")),
    ],
    "text10.json": [
        dict(id="u0", conversations=_conv("Name three primary colours.", "Red, yellow and blue.")),
        dict(id="u1", conversations=_conv("What is 12 times 7?", "12 times 7 is 84.")),
        dict(id="u2", conversations=_conv("Translate 'good morning' into French.", "Bonjour.",
                                          "And into German?", "Guten Morgen.")),
        dict(id="u3", conversations=_conv("Explain photosynthesis in one sentence.",
                                          "Plants turn light, water and carbon dioxide into sugar and oxygen.")),
        dict(id="u4", conversations=_conv("今天天气怎么样？", "我无法查看实时天气，请查看天气预报。")),
        dict(id="u5", conversations=_conv("List two prime numbers.", "2 and 3.")),
        dict(id="u6", conversations=_conv("Who wrote Hamlet?", "William Shakespeare.",
                                          "When?", "Around 1600.")),
        dict(id="u7", conversations=_conv("Give me a synonym of 'quick'.", "Fast.")),
        dict(id="u8", conversations=_conv("What does CPU stand for?", "Central processing unit.")),
        dict(id="u9", conversations=_conv("Spell 'cat' backwards.", "t-a-c")),
    ],
    # max_length 900 with hd_num 1 (841 positions an image): c1 and c2 have every answer beyond the cut, each in a
    # micro-batch with a sample that keeps its answer (upstream averages over the targets left); c5 is cut mid-answer;
    # c6 and c7 are both cut (a micro-batch without target).
    "cut_images.json": [
        dict(id="c0", image="tests/assets/chelsea.png",
             conversations=_conv("What animal is this?", "A cat.")),
        dict(id="c1", image="tests/assets/coffee.png",
             conversations=_conv(LONG_QUESTION, "A cup of coffee.")),
        dict(id="c2", image="tests/assets/astronaut.png",
             conversations=_conv(LONG_QUESTION, "An astronaut.", "And the flag?", "It is behind him.")),
        dict(id="c3", image="tests/assets/rocket_portrait.png",
             conversations=_conv("<ImageHere>What is this?", "A rocket on its launch pad.")),
        dict(id="c4", image="tests/assets/chelsea_tiny.png",
             conversations=_conv("Describe it.", "A small grey cat.")),
        dict(id="c5", image="tests/assets/coffee_strip_1x8.png",
             conversations=_conv("What is in the strip?", " ".join(["A coffee cup seen from the side."] * 12))),
        # A micro-batch without any target: upstream's loss is NaN (CrossEntropyLoss over no target), its gradients
        # zeros; the Trainer's logging_nan_inf_filter replaces the NaN in the logged loss.
        dict(id="c6", image="tests/assets/rocket_strip_8x1.png",
             conversations=_conv(LONG_QUESTION, "A rocket.")),
        dict(id="c7", image="tests/assets/chelsea.png",
             conversations=_conv(LONG_QUESTION, "A cat.")),
    ],
    # t0's question alone is longer than max_length (text2emb cuts the tokens): no target left in that row.
    "cut_text.json": [
        dict(id="x0", conversations=_conv(" ".join(["Please read all of this carefully."] * 150), "Done.")),
        dict(id="x1", conversations=_conv("What is the capital of Italy?", "Rome.")),
        dict(id="x2", conversations=_conv("Say yes.", "Yes.")),
        dict(id="x3", conversations=_conv("Count to three.", "One, two, three.")),
    ],
}

DATA_TXT = {
    "lora_image.txt": ["lora_image.json"],
    "lora_text.txt": ["text4.json"],
    "full_mixed.txt": ["mixed_images.json", "text4.json"],
    "full_epochs.txt": ["text10.json"],
    "lora_cut.txt": ["cut_images.json", "cut_text.json"],
}

COMMON = ["--bf16", "False", "--fp16", "False", "--logging_steps", "1", "--report_to", "none",
          "--save_strategy", "no", "--evaluation_strategy", "no", "--per_device_train_batch_size", "1",
          "--weight_decay", "0.1", "--adam_beta2", "0.95", "--learning_rate", "1e-3", "--max_length", "4096"]
LORA = ["--use_lora", "True", "--fix_vit", "True", "--fix_sampler", "True", "--lora_dropout", "0"]

CASES = [
    dict(name="lora_image", data="lora_image.txt",
         argv=LORA + ["--hd_num", "1", "--batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "3",
                      "--warmup_steps", "1", "--lr_scheduler_type", "cosine", "--lora_r", "8", "--lora_alpha", "16",
                      "--max_grad_norm", "1.0"]),
    dict(name="lora_text", data="lora_text.txt",
         argv=LORA + ["--batch_size", "2", "--gradient_accumulation_steps", "3", "--max_steps", "4",
                      "--warmup_ratio", "0.5", "--lr_scheduler_type", "linear", "--lora_r", "4", "--lora_alpha", "8",
                      "--max_grad_norm", "0.3"]),
    dict(name="full_mixed", data="full_mixed.txt",
         argv=["--use_lora", "False", "--fix_vit", "False", "--fix_sampler", "False", "--hd_num", "2",
               "--batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "4", "--warmup_steps", "2",
               "--lr_scheduler_type", "cosine", "--max_grad_norm", "4.0"]),
    dict(name="full_epochs", data="full_epochs.txt",
         argv=["--use_lora", "False", "--fix_vit", "True", "--fix_sampler", "True", "--batch_size", "2",
               "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--warmup_steps", "2",
               "--lr_scheduler_type", "constant_with_warmup", "--max_grad_norm", "3.5"]),
    # The tiny default max_position_embeddings (1024): the image micro-batch (1267 positions) comes first, so
    # upstream's dynamic-NTK tables are rescaled for 1267 and the text micro-batches after it are rotated with them.
    dict(name="lora_ntk", data="full_mixed.txt", config_overrides={},
         argv=LORA + ["--hd_num", "2", "--batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "3",
                      "--warmup_steps", "1", "--lr_scheduler_type", "cosine", "--lora_r", "4", "--lora_alpha", "8",
                      "--max_grad_norm", "1.0"]),
    # Two of the five linears, polynomial decay, image and text micro-batches.
    dict(name="lora_subset", data="full_mixed.txt",
         argv=LORA + ["--hd_num", "1", "--batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "3",
                      "--warmup_steps", "1", "--lr_scheduler_type", "polynomial", "--lora_r", "4", "--lora_alpha", "16",
                      "--lora_target_modules", "attention.wqkv", "feed_forward.w2", "--max_grad_norm", "1.3"]),
    # Upstream's truncation: samples whose supervised tokens all lie beyond --max_length, each in a micro-batch with
    # one that keeps targets (image and text micro-batches; the cut sample first and second): the micro-batch's loss
    # is the mean over the targets left, the cut sample contributes nothing.
    dict(name="lora_cut", data="lora_cut.txt",
         argv=LORA + ["--hd_num", "1", "--batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "3",
                      "--warmup_steps", "1", "--lr_scheduler_type", "cosine", "--lora_r", "4", "--lora_alpha", "8",
                      "--max_grad_norm", "1.0", "--max_length", "900"]),
    # The projector trains, the ViT does not; hard-restart cosine; a different beta2 and epsilon.
    dict(name="full_sampler", data="lora_image.txt",
         argv=["--use_lora", "False", "--fix_vit", "True", "--fix_sampler", "False", "--hd_num", "1",
               "--batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "3", "--warmup_steps", "1",
               "--lr_scheduler_type", "cosine_with_restarts", "--adam_beta2", "0.999", "--adam_epsilon", "1e-6",
               "--max_grad_norm", "3.7"]),
]
for _c in CASES:
    common = COMMON[:-2] if "--max_length" in _c["argv"] else COMMON  # a case's own --max_length replaces 4096
    _c["argv"] = common + ["--data_path", f"{DATA_REL}/{_c['data']}"] + _c["argv"]
    # The tiny config's max_position_embeddings (1024) is below the image micro-batches' lengths (up to 1722):
    # upstream's dynamic-NTK RoPE would rescale its base on the first long micro-batch and keep the scaled tables
    # for every later one (text micro-batches after an image one then differ by up to 3e-4 in loss). The release
    # (24576 against finetune's max_length 16384) never gets there in training: raise it likewise.
    _c.setdefault("config_overrides", {"max_position_embeddings": 4096})
    _c.setdefault("seed", 0)


def write_data_files():
    os.makedirs(os.path.join(REPO, DATA_REL), exist_ok=True)
    for name, records in DATA_FILES.items():
        with open(os.path.join(REPO, DATA_REL, name), "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1, ensure_ascii=False)
            f.write("\n")
    for name, files in DATA_TXT.items():
        with open(os.path.join(REPO, DATA_REL, name), "w", encoding="utf-8") as f:
            f.write("".join(f"{DATA_REL}/{j}\n" for j in files))


# ---------------------------------------------------------------------------------------------------------
# Patched pieces


def make_sequential_mix(data_mix, log):
    """Stands in for data_mix.Mix_dataset (same constructor, same items): --sampling sequential."""
    from torch.utils.data import Dataset

    import make_finetune_data_fixtures as D

    class SequentialMix(Dataset):
        def __init__(self, json_datas, batch_size=1, local_rank=0, resolution=560, hd_num=18):
            super().__init__()
            self.batch_size = batch_size
            self.subsets = []
            self.flat = []  # (subset, index in it), files in data.txt order
            for _, d in json_datas.items():
                has_img = "image" in d[0].keys()
                sub = data_mix.Sample_dataset(d, batch_size, has_img=has_img, resolution=resolution, hd_num=hd_num)
                self.flat += [(len(self.subsets), i) for i in range(len(d))]
                self.subsets.append(sub)
            if any(len(s) % batch_size for s in self.subsets):
                raise SystemExit("every data file's sample count must be a multiple of --batch_size")

        def __len__(self):
            return int(len(self.flat) / self.batch_size)

        def __getitem__(self, k):
            n = len(self.flat)
            picks = [self.flat[(k * self.batch_size + t) % n] for t in range(self.batch_size)]
            (which,) = {s for s, _ in picks}
            with D.scripted_sample_draws([i for _, i in picks]):
                sample = self.subsets[which].get_item()
            log.append(dict(item=k, samples=[(k * self.batch_size + t) % n for t in range(self.batch_size)],
                            data_type=sample["data_type"]))
            return dict(samples=sample)

    return SequentialMix


def all_texts_collator(finetune):
    """Upstream's collator, except that text-only items keep all their texts."""
    upstream_call = finetune.DataCollatorForSupervisedDataset.__call__

    def __call__(self, instances):
        if "image" in instances[0]["samples"]:
            return upstream_call(self, instances)
        samples = [inst["samples"] for inst in instances]
        return dict(samples=dict(text_input=[t for s in samples for t in s["text_input"]],
                                 data_type=[s["data_type"] for s in samples]))

    return __call__


class Recorder:
    """What one run records besides what the Trainer writes."""

    def __init__(self):
        self.trainer = None
        self.items = []           # dataset items in the order built
        self.micro_losses = []    # unscaled loss of each micro-batch, in order
        self.shapes = []          # [B, L] of each micro-batch's decoder input
        self.norms = []           # total norm returned by each clipping call
        self.grad_none = []       # per optimizer step: trainable names whose grad was None
        self.step_ends = []       # per optimizer step: micro-batches run so far
        self.gathered = []        # (tr_loss value, steps since last log) at each logging
        self.embedding_ids = set()
        self.initial_adapter = {}
        self.adapter_config = None


def make_trainer_class(Trainer, rec):
    import torch

    class RecordingTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rec.trainer = self

        def _get_train_sampler(self):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False):
            out = super().compute_loss(model, inputs, return_outputs)
            loss = out[0] if return_outputs else out
            rec.micro_losses.append(float(loss.detach()))
            return out

        def _nested_gather(self, tensors, name=None):
            # Only _maybe_log_save_evaluate gathers during training: it rounds what it gathers.
            rec.gathered.append((float(tensors.detach().mean()), self.state.global_step - self._globalstep_last_logged))
            return super()._nested_gather(tensors, name)

        def log(self, logs):
            if "loss" in logs and "train_loss" not in logs:
                value, steps = rec.gathered[-1]
                logs["loss"] = value / steps
                logs["grad_norm"] = rec.norms[-1]
            return super().log(logs)

    return RecordingTrainer


@contextlib.contextmanager
def patched(up_dir, case, finetune, data_mix, rec):
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from torch import nn

    import upstream as U
    from mindxcomposer.demo import tiny_config

    config = tiny_config(**case["config_overrides"])
    model = U.load_upstream(up_dir, config, seed=case["seed"])
    for m in model.modules():
        if hasattr(m, "Plora_A"):
            m.lora_dropout = nn.Identity()  # upstream hard-codes p=0.05 (our --plora_dropout 0)
    model.model.tok_embeddings.register_forward_pre_hook(
        lambda mod, args: rec.embedding_ids.update(int(i) for i in args[0].reshape(-1)))
    model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: rec.shapes.append(list(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    model.tokenizer.padding_side = "right"

    class FakeConfig:
        @staticmethod
        def from_pretrained(name, **kw):
            return model.config

    class FakeModel:
        @staticmethod
        def from_pretrained(name, config=None, **kw):
            assert config is model.config
            model.max_length = config.max_length  # what __init__ does from the config it is given
            return model

    class FakeTokenizer:
        @staticmethod
        def from_pretrained(name, padding_side="right", **kw):
            model.tokenizer.padding_side = padding_side
            return model.tokenizer

    # The transformers module finetune.py calls (sys.modules' entry can be replaced during a run).
    transformers = finetune.transformers
    real_get_peft_model = finetune.get_peft_model

    def get_peft_model(m, lora_config):
        peft_model = real_get_peft_model(m, lora_config)
        cfg = peft_model.peft_config["default"].to_dict()
        rec.adapter_config = {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in cfg.items()}
        rng = np.random.default_rng(1000 + case["seed"])
        shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
        for k in sorted(shapes):
            rec.initial_adapter[k] = (ADAPTER_SCALE * rng.standard_normal(shapes[k])).astype(np.float32)
        result = set_peft_model_state_dict(peft_model, {k: torch.from_numpy(v) for k, v in rec.initial_adapter.items()})
        assert not result.unexpected_keys, result.unexpected_keys
        return peft_model

    real_clip = Accelerator.clip_grad_norm_

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        named = [(n, p) for n, p in rec.trainer.model.named_parameters() if p.requires_grad]
        rec.grad_none.append([n for n, p in named if p.grad is None])
        rec.step_ends.append(len(rec.micro_losses))
        norm = real_clip(self, parameters, max_norm, norm_type)
        rec.norms.append(float(norm))
        return norm

    saved = dict(
        cuda=torch.Tensor.cuda, argv=sys.argv, auto=(transformers.AutoConfig, transformers.AutoModelForCausalLM,
                                                     transformers.AutoTokenizer),
        mix=finetune.Mix_dataset, collate=finetune.DataCollatorForSupervisedDataset.__call__,
        trainer=finetune.Trainer, gpm=finetune.get_peft_model, clip=Accelerator.clip_grad_norm_)
    torch.Tensor.cuda = lambda self, *a, **k: self
    transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer = (
        FakeConfig, FakeModel, FakeTokenizer)
    finetune.Mix_dataset = make_sequential_mix(data_mix, rec.items)
    finetune.DataCollatorForSupervisedDataset.__call__ = all_texts_collator(finetune)
    finetune.Trainer = make_trainer_class(saved["trainer"], rec)
    finetune.get_peft_model = get_peft_model
    Accelerator.clip_grad_norm_ = clip_grad_norm_
    try:
        yield model
    finally:
        torch.Tensor.cuda = saved["cuda"]
        sys.argv = saved["argv"]
        transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer = saved["auto"]
        finetune.Mix_dataset = saved["mix"]
        finetune.DataCollatorForSupervisedDataset.__call__ = saved["collate"]
        finetune.Trainer = saved["trainer"]
        finetune.get_peft_model = saved["gpm"]
        Accelerator.clip_grad_norm_ = saved["clip"]


# ---------------------------------------------------------------------------------------------------------
# One case


def saved_name(name):
    """peft's saved names drop the adapter name; upstream names otherwise."""
    return name.replace(".default.", ".")


def run_case(case, up_dir, finetune, data_mix, arrays):
    import torch
    from torch import nn

    rec = Recorder()
    start = time.time()
    with tempfile.TemporaryDirectory() as out_dir, patched(up_dir, case, finetune, data_mix, rec) as base_model:
        sys.argv = ["finetune.py", "--model_name_or_path", "upstream-tiny", "--output_dir", out_dir] + case["argv"]
        finetune.train()
        trainer = rec.trainer
        with open(os.path.join(out_dir, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        saved = {}  # what safe_save_model_for_hf_trainer wrote (names only)
        for fn in sorted(os.listdir(out_dir)):
            if fn == "training_args.bin":
                continue
            if fn.endswith(".bin"):
                saved[fn] = sorted(torch.load(os.path.join(out_dir, fn), map_location="cpu", weights_only=True))
            elif fn.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(os.path.join(out_dir, fn), "pt") as st:
                    saved[fn] = sorted(st.keys())
        model = trainer.model
        dropouts = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
        if dropouts:
            raise SystemExit(f"{case['name']}: dropout left active in {dropouts}")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        opt = trainer.optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        no_decay = sorted(names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"])
        adam_steps = {names[id(p)]: int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]
                      if p in opt.state}
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in trainable:
                key = saved_name(n)
                value = params[n].detach().float().numpy()
                if key in BIG:
                    rows = sorted(rec.embedding_ids | set(int(i) for i in base_model.tokenizer.all_special_ids)
                                  | {int(base_model.tokenizer.pad_token_id), int(base_model.tokenizer.eos_token_id),
                                     int(base_model.tokenizer.bos_token_id), 92542, 92543}
                                  | set(int(i) for i in np.random.default_rng(7).choice(value.shape[0], RANDOM_ROWS,
                                                                                        replace=False)))
                    rows = np.asarray(rows, dtype=np.int64)
                    arrays[f"{case['name']}/rows/{key}"] = rows
                    arrays[f"{case['name']}/final_rows/{key}"] = value[rows].astype(np.float32)
                    # Computed in float64, stored in float32 (6e-8 relative) to keep the folder small.
                    arrays[f"{case['name']}/final_rownorm/{key}"] = np.sqrt(
                        (value.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32)
                else:
                    arrays[f"{case['name']}/final/{key}"] = value.astype(np.float32)
        for k, v in rec.initial_adapter.items():
            arrays[f"{case['name']}/initial/{k}"] = v
        seconds = time.time() - start
    max_norm = trainer.args.max_grad_norm
    steps = [e for e in state["log_history"] if "loss" in e and "train_loss" not in e]
    ga = trainer.args.gradient_accumulation_steps
    per_step = [list(range(a, b)) for a, b in zip([0] + rec.step_ends[:-1], rec.step_ends)]
    for k, (entry, mbs) in enumerate(zip(steps, per_step)):
        # logging_steps 1: the Trainer's logging_nan_inf_filter turns a NaN micro-batch loss into the step's loss so
        # far (tr_loss += tr_loss / (1 + global_step - last_logged), with global_step == last_logged).
        expected = np.float32(0)
        for i in mbs:
            loss = np.float32(rec.micro_losses[i])
            expected = expected + (expected if np.isnan(loss) else loss / np.float32(ga))
        if abs(entry["loss"] - expected) > 1e-5 * abs(expected):
            raise SystemExit(f"{case['name']} step {entry['step']}: logged loss {entry['loss']} is not the sum of its "
                             f"micro-batch losses / {ga} ({expected})")
    if len(steps) < 3 or not any(e["grad_norm"] > max_norm for e in steps):
        raise SystemExit(f"{case['name']}: needs >= 3 steps and clipping active on one, got "
                         f"{[(e['step'], e['grad_norm']) for e in steps]} against max_grad_norm {max_norm}")
    info = dict(adapter_config=rec.adapter_config, trainable=[saved_name(n) for n in trainable],
                no_decay=[saved_name(n) for n in no_decay],
                adam_steps={saved_name(k): v for k, v in adam_steps.items()},
                grad_none_per_step=[[saved_name(n) for n in g] for g in rec.grad_none],
                micro_batches=[dict(it, shape=sh, loss=None if np.isnan(loss) else loss)  # null: upstream's NaN
                               for it, sh, loss in zip(rec.items, rec.shapes, rec.micro_losses)],
                micro_batches_per_step=per_step, saved_files=saved,
                seconds=round(seconds, 1))
    return state, info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetune", required=True, help="upstream's finetune/ folder")
    ap.add_argument("--upstream", required=True, help="upstream's IXC2.5 model code folder (see README.md here)")
    ap.add_argument("--site", help="folder with torchvision etc. installed by pip --target (see the data script)")
    ap.add_argument("--case", action="append", help="run only these cases (the others are kept from cases.json)")
    args = ap.parse_args()
    os.chdir(REPO)
    sys.path.insert(0, HERE)
    import make_finetune_data_fixtures as D
    D.ensure_torchvision(args.site)
    import peft
    import torch
    import transformers
    torch.set_num_threads(2)
    data_mix, finetune, stood_in = D.import_finetune(args.finetune)
    write_data_files()
    out = os.path.join(REPO, OUT_REL)
    cases_path = os.path.join(out, "cases.json")
    previous = {}
    if os.path.exists(cases_path):
        with open(cases_path, encoding="utf-8") as f:
            previous = {c["name"]: c for c in json.load(f)["cases"]}
    results = []
    for case in CASES:
        if args.case and case["name"] not in args.case:
            if case["name"] in previous:
                results.append(previous[case["name"]])
            else:
                print(f"case {case['name']} not run and absent from cases.json: left out")
            continue
        arrays = {}
        state, info = run_case(case, os.path.abspath(args.upstream), finetune, data_mix, arrays)
        np.savez_compressed(os.path.join(out, f"{case['name']}.npz"), **{
            k[len(case["name"]) + 1:]: v for k, v in arrays.items()})
        with open(os.path.join(out, f"{case['name']}.trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
            f.write("\n")
        results.append(dict(name=case["name"], argv=case["argv"], config_overrides=case["config_overrides"],
                            seed=case["seed"], initial_adapter="--use_lora" in case["argv"] and
                            case["argv"][case["argv"].index("--use_lora") + 1] == "True",
                            data=f"{DATA_REL}/{case['data']}", **info))
        print(f"{case['name']}: {info['seconds']:.1f} s, losses "
              f"{[e.get('loss') for e in state['log_history']]}, grad norms "
              f"{[e.get('grad_norm') for e in state['log_history']]}", flush=True)
    result = dict(versions=dict(python=platform.python_version(), torch=torch.__version__,
                                transformers=transformers.__version__, peft=peft.__version__,
                                accelerate=__import__("accelerate").__version__, numpy=np.__version__,
                                stood_in=stood_in),
                  adapter_scale=ADAPTER_SCALE, random_rows=RANDOM_ROWS, cases=results)
    with open(cases_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(out) for fn in fns)
    print(f"{out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
