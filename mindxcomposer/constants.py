"""Names and defaults that several modules share, each defined once here (a leaf: imports nothing of ours).

Upstream's checkpoint and code fix most of them: the task-LoRA names and which `infer_mode` uses which,
the decoder's linear names, the turn tokens of the chat template, `chat`'s decoding defaults.
"""
import os

# Task LoRAs of the release checkpoint (`<linear>.<task>_A.weight`, `..._B.weight`) and the infer_mode that
# adds each: "web" the web LoRA, "write" sft then dpo (in that order), "base" none.
TASK_LORAS = ("lora_web", "lora_sft", "lora_dpo")
INFER_MODES = ("base", "web", "write")
TASKS_OF_MODE = {"base": (), "web": ("lora_web",), "write": ("lora_sft", "lora_dpo")}
MERGE_TASKS = {mode: tasks for mode, tasks in TASKS_OF_MODE.items() if tasks}  # mxc-convert --merge-task

# The decoder layer's linears (PLoRA linears in IXC2.5), in the order of the layer's flat weight tuple and of
# every per-linear list (adapter targets, gradients).
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")

# InternLM2's chat template: a turn is BEGIN_TURN + role + "\n" + text + END_TURN + "\n".
BEGIN_TURN = "[UNUSED_TOKEN_146]"
END_TURN = "[UNUSED_TOKEN_145]"  # also the end-of-assistant token decoding stops at
IMAGE_MARKER = "<ImageHere>"

# The InternLM2 tokenizer shipped with the package (the release's tokenizer.model), and its file name in a
# model directory.
BUNDLED_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "internlm2_tokenizer.model")
TOKENIZER_FILE = "tokenizer.model"

# One ViT tile: 560 pixels in every IXC2.5 model.
TILE = 560
# The file extensions upstream's `encode_img` dispatches on.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".wmv"})

# Upstream's hd_num (most 560-px tiles of an image) for one image, and for each of several images.
SINGLE_IMAGE_HD_NUM = 24
MULTI_IMAGE_HD_NUM = 6

# `model.chat`'s defaults (upstream's): the server's absent parameters mean the same.
CHAT_DEFAULTS = dict(max_new_tokens=1024, temperature=1.0, top_p=0.8, top_k=50, repetition_penalty=1.005,
                     hd_num=SINGLE_IMAGE_HD_NUM, num_beams=1, infer_mode="base")


def default_context(config) -> int:
    """Cache slots a served conversation may use by default: the model's `max_length` plus room for
    `chat`'s default `max_new_tokens`."""
    return config.max_length + CHAT_DEFAULTS["max_new_tokens"]
