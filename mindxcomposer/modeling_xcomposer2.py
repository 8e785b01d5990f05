"""InternLMXComposer2ForCausalLM: the IXC2.5 model with upstream's public names.

`__call__` takes upstream's arguments (`input_ids` or `inputs_embeds`, `im_mask`, `infer_mode`, ...), does
the host-side preparation (RoPE angles, attention mask) and runs the decoder layer by layer, then the
output head; MindSpore compiles each (one graph for all layers) when the caller's context is GRAPH_MODE. The vision path (`img2emb`)
likewise runs its cells in whatever mode the caller chose; loading never touches the global context.
"""
import threading
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.common.np_dtype import bfloat16 as _BF16_NP  # numpy's bf16 (ms.dtype_to_nptype is deprecated)

from .chat import ChatMixin
from .configuration import InternLMXComposer2Config
from .constants import INFER_MODES, LINEARS, TASK_LORAS, TASKS_OF_MODE
from .errors import InvalidArgumentError
from .image_processing import global_view, pixel_values
from .layers import Linear, lazy_param
from .modeling_clip import CLIPVisionTower
from .modeling_internlm2 import InternLM2Model
from .ops import BF16, EXACT, enable_kernels, fused_attention_available
from .prompt import build_inputs, interleave_chat
from .quantization import is_part_name
from .rope import packed_rope
from .tokenization_internlm2 import load_model_tokenizer
from .validation import check_chat_inputs, check_image, check_int, check_model_dir, check_token_ids, require_tokenizer
from .vision import HDMerge, VisionProjector
from .weights import (Checkpoint, CheckpointError, bf16_to_fp32, check_names_and_shapes, fp32_to_bf16,
                      parameter_shapes, sizes_from_weights)

_DTYPE_NAMES = {"bf16": ms.bfloat16, "bfloat16": ms.bfloat16, "fp16": ms.float16, "float16": ms.float16,
                "fp32": ms.float32, "float32": ms.float32}
_ST_TO_MS = {"BF16": ms.bfloat16, "F16": ms.float16, "F32": ms.float32}


def resolve_dtype(dtype, what="dtype"):
    """A MindSpore float dtype from a dtype or its name ('bf16', 'fp16', 'fp32')."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise InvalidArgumentError(f"{what} must be one of {sorted(_DTYPE_NAMES)} or a MindSpore float dtype, got {dtype!r}")
        return _DTYPE_NAMES[dtype.lower()]
    if dtype not in (ms.bfloat16, ms.float16, ms.float32):
        raise InvalidArgumentError(f"{what} must be bf16, fp16 or fp32, got {dtype!r}")
    return dtype


def default_compute_dtype(storage_dtype):
    """fp32 arithmetic except on Ascend, which computes in the stored dtype as upstream runs on GPU."""
    return storage_dtype if ms.get_context("device_target") == "Ascend" else ms.float32


def arithmetic(storage_dtype, compute_dtype=None):
    """(activation dtype, product mode) for a model: `compute_dtype` None is `default_compute_dtype`.
    On Ascend the activations are in the compute dtype and its cube units multiply in it. Elsewhere the
    activations stay fp32 (MindSpore's CPU has no bf16 arithmetic) and `compute_dtype="bf16"` means
    bf16 products: each product's inputs rounded to bf16, accumulated in fp32 (`ops.weight_products`)."""
    if compute_dtype is None:
        return default_compute_dtype(storage_dtype), EXACT
    compute_dtype = resolve_dtype(compute_dtype, "compute_dtype")
    if ms.get_context("device_target") != "Ascend" and compute_dtype == ms.bfloat16:
        return ms.float32, BF16
    return compute_dtype, EXACT


def to_storage(arr: np.ndarray, dtype, src_code: str = "F32") -> Tensor:
    """A Tensor of `dtype` from a checkpoint array: bf16 bits (uint16, `src_code` 'BF16') or floats.
    bf16 -> bf16 keeps the stored bits and makes no fp32 copy; widening casts are exact."""
    if src_code == "BF16":
        if dtype == ms.bfloat16:
            return Tensor.from_numpy(np.ascontiguousarray(arr).view(_BF16_NP))
        arr = bf16_to_fp32(arr)
    if dtype == ms.bfloat16:
        return Tensor.from_numpy(fp32_to_bf16(np.asarray(arr, np.float32)).view(_BF16_NP))
    return Tensor(np.asarray(arr, np.float32 if dtype == ms.float32 else np.float16))

_MASK_MIN = np.finfo(np.float32).min


@dataclass
class CausalLMOutput:
    logits: Tensor  # [batch, length, vocab], fp32
    hidden_states: Optional[Tuple[Tensor, ...]] = None


def to_numpy(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def causal_mask(attention_mask: np.ndarray, q_len: int) -> np.ndarray:
    """Additive [B, 1, q_len, S] mask: the last q_len queries see keys at or before them that are not padding.
    Masked entries hold fp32's min, as upstream's `_make_causal_mask`."""
    b, s = attention_mask.shape
    q_pos = np.arange(s - q_len, s)[:, None]
    visible = (np.arange(s)[None, :] <= q_pos)[None] & (attention_mask[:, None, :] > 0)
    return np.where(visible, np.float32(0), _MASK_MIN).astype(np.float32)[:, None]


def default_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """As Hugging Face's generate: cumulative count of real tokens, padding set to 1."""
    pos = np.cumsum(attention_mask.astype(np.int64), axis=-1) - 1
    return np.where(attention_mask > 0, pos, 1)


class InternLMXComposer2ForCausalLM(ChatMixin, nn.Cell):
    """`dtype` is the storage dtype of the parameters, `compute_dtype` the dtype of the arithmetic
    (default: fp32 on CPU and GPU, the storage dtype on Ascend). bf16 storage with fp32 arithmetic
    gives exactly what an fp32-stored copy of the same bf16 weights gives (bf16 -> fp32 is exact).

    Task LoRAs (`lora_web`, `lora_sft`, `lora_dpo`) are not resident after loading: the first call in a
    mode that needs them brings them in from the checkpoint and drops those of other modes
    (`use_task_loras`)."""

    def __init__(self, config: InternLMXComposer2Config, dtype=ms.float32, use_fused_attention=None,
                 compute_dtype=None):
        super().__init__()
        if use_fused_attention is None:
            use_fused_attention = fused_attention_available()
        dtype = resolve_dtype(dtype)
        self.config = config
        self.dtype = dtype
        self.thread_state = threading.local()  # `last_session` (chat.py), per calling thread
        self.compute_dtype, self.products = arithmetic(dtype, compute_dtype)
        if self.compute_dtype == ms.float32:
            enable_kernels()  # the CPU product kernels; the portable MatMul path serves if they cannot be built
        self.model = InternLM2Model(config, dtype, use_fused_attention, self.compute_dtype, self.products)
        self.output = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, products=self.products)
        v = config.vision_config
        self.vit = CLIPVisionTower(v, dtype, self.compute_dtype, self.products)
        self.vit_micro_batch = None  # crops per ViT call (None: the tower's default, 1)
        self.vision_proj = VisionProjector(config.vision_merged_size, config.projector_hidden_size,
                                           config.hidden_size, dtype, self.compute_dtype, self.products)
        self.plora_glb_GN = lazy_param((1, 1, config.vision_merged_size), dtype, "plora_glb_GN")
        self.plora_sub_GN = lazy_param((1, 1, 1, config.vision_merged_size), dtype, "plora_sub_GN")
        self.merger = HDMerge(v.image_size // v.patch_size)
        self.tokenizer = None
        self.max_length = config.max_length
        self._task_source = None  # name -> (array, safetensors dtype code) of the task LoRAs not resident
        self.resident_tasks = ()
        self.task_version = 0  # counts changes of the resident task LoRAs (sessions rebuild on a change)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, dtype=None, use_fused_attention=None, compute_dtype=None):
        """Load a model directory in the upstream Hugging Face layout (config.json + safetensors with
        upstream names) or as written by `mxc-convert`. Sizes that config.json does not carry (PLoRA rank,
        task LoRAs, projector width) are read off the weight shapes.

        `dtype` is the storage dtype: None keeps the checkpoint's (a bf16 checkpoint stays bf16 in
        memory, no fp32 copy is made), or 'bf16' / 'fp16' / 'fp32'. `compute_dtype`: see the class."""
        dtype = None if dtype is None else resolve_dtype(dtype)
        if compute_dtype is not None:
            resolve_dtype(compute_dtype, "compute_dtype")  # checked before anything loads
        path = check_model_dir(path, dtype, use_fused_attention=use_fused_attention)
        config = InternLMXComposer2Config.from_pretrained(path)
        tokenizer = load_model_tokenizer(path)  # before the weights: a broken tokenizer.model fails fast
        ckpt = Checkpoint(path)
        for k, v in sizes_from_weights(ckpt).items():
            setattr(config, k, v)
        expected = parameter_shapes(config)
        check_names_and_shapes(expected, ckpt, path)
        if dtype is None:
            dtype = _ST_TO_MS.get(ckpt.dtype("model.tok_embeddings.weight"), ms.float32)
        model = cls(config, dtype, use_fused_attention, compute_dtype)
        model.load_weights(ckpt)
        model.name_or_path = path
        model.tokenizer = tokenizer
        return model

    def load_weights(self, ckpt: Checkpoint) -> None:
        """Set every resident parameter from the checkpoint, in the storage dtype; task LoRAs are read
        from it when a mode needs them."""
        self._forget_task_loras()
        self._set_parameters((n, ckpt.raw(n), ckpt.dtype(n)) for n in ckpt.keys() if not _is_task_lora(n))
        self._task_source = lambda name: (ckpt.raw(name), ckpt.dtype(name))

    def load_state_dict(self, items) -> None:
        """Set every parameter from (upstream name, float32 array) pairs or a dict; all must be present.
        Task-LoRA arrays are kept aside (host memory) until a mode needs them."""
        items = items.items() if isinstance(items, dict) else items
        tasks = {}
        self._forget_task_loras()

        def resident():
            for name, arr in items:
                if _is_task_lora(name):
                    tasks[name] = arr
                else:
                    yield name, arr, "F32"

        self._set_parameters(resident())
        expected = {n for n in parameter_shapes(self.config) if _is_task_lora(n)}
        missing = sorted(expected - set(tasks))
        unexpected = sorted(set(tasks) - expected)
        if missing or unexpected:
            raise CheckpointError(f"task LoRA parameters missing: {missing[:20]}; unexpected: {unexpected[:20]}")
        self._task_source = lambda name: (tasks[name], "F32")

    def _forget_task_loras(self) -> None:
        """Before new weights: drop the resident task LoRAs (they hold the old ones); the version bump makes
        sessions built on the model rebuild."""
        if self.resident_tasks:
            for layer in self.model.layers:
                for name in LINEARS:
                    for task in self.resident_tasks:
                        layer.plora(name).drop_task(task)
        self.resident_tasks = ()
        self.task_version += 1

    def _set_parameters(self, items) -> None:
        params = {p.name: p for p in self.get_parameters()}
        seen = set()
        for name, arr, code in items:
            if name not in params:
                raise CheckpointError(f"unexpected parameter {name!r}")
            p = params[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise CheckpointError(f"{name}: checkpoint shape {tuple(arr.shape)} vs model {tuple(p.shape)}")
            if is_part_name(name):  # a quantized weight's part keeps its own dtype (int8, uint8, fp32 scales)
                if np.dtype(arr.dtype) != np.dtype(ms.dtype_to_nptype(p.dtype)):
                    raise CheckpointError(f"{name}: checkpoint dtype {arr.dtype} vs model {p.dtype} "
                                          f"(quantization_config {self.config.quantization_config})")
                p.set_data(Tensor(np.ascontiguousarray(arr)))
            else:
                p.set_data(to_storage(arr, self.dtype, code))
            seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            raise CheckpointError(f"no value for parameters: {missing[:20]}")

    def use_task_loras(self, infer_mode: str) -> tuple:
        """Make resident exactly the task LoRAs `infer_mode` needs ('web': lora_web; 'write': lora_sft and
        lora_dpo; 'base': none), reading them from the checkpoint, and drop the others to free their
        memory. Returns the resident tasks, in the order they apply."""
        self.check_infer_mode(infer_mode)
        wanted = tuple(t for t in TASKS_OF_MODE[infer_mode] if t in self.config.task_lora_ranks)
        if wanted == self.resident_tasks:
            return wanted
        for layer_i, layer in enumerate(self.model.layers):
            for name in LINEARS:
                plora = layer.plora(name)
                for task in self.resident_tasks:
                    if task not in wanted:
                        plora.drop_task(task)
                for task in wanted:
                    if task in self.resident_tasks:
                        continue
                    prefix = f"model.layers.{layer_i}.{name}"
                    for p in plora.add_task(task, self.config.task_lora_ranks[task], prefix):
                        arr, code = self._task_source(p.name)
                        if tuple(arr.shape) != tuple(p.shape):
                            raise CheckpointError(f"{p.name}: checkpoint shape {tuple(arr.shape)} vs model "
                                                  f"{tuple(p.shape)}")
                        p.set_data(to_storage(arr, self.dtype, code))
        self.resident_tasks = wanted
        self.task_version += 1
        return wanted

    # ------------------------------------------------------------------ decoder
    def check_infer_mode(self, infer_mode):
        if infer_mode not in INFER_MODES:
            raise ValueError(f"infer_mode must be one of {INFER_MODES}, got {infer_mode!r}")
        merged = self.config.merged_task_lora
        if merged and infer_mode not in ("base", merged):
            raise ValueError(f"this model has the {merged!r} task LoRA merged into its weights (mxc-convert "
                             f"--merge-task): infer_mode {infer_mode!r} cannot be served; every mode computes "
                             f"{merged!r}")

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def embed_tokens(self, input_ids) -> np.ndarray:
        ids = Tensor(check_token_ids(input_ids, self.config.vocab_size).astype(np.int32))
        return self.model.tok_embeddings(ids).astype(ms.float32).asnumpy()

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                 im_mask=None, infer_mode="base", output_hidden_states=False, **kwargs):
        self.check_infer_mode(infer_mode)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            embeds = self.embed_tokens(input_ids)
            im_mask = None  # upstream: token ids never take the image LoRA path
        else:
            embeds = to_numpy(inputs_embeds).astype(np.float32)
        if embeds.ndim != 3 or embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, length, {self.config.hidden_size}], got {embeds.shape}")
        b, n, _ = embeds.shape
        am = np.ones((b, n), np.int64) if attention_mask is None else to_numpy(attention_mask).astype(np.int64)
        if position_ids is None:
            position_ids = default_position_ids(am) if attention_mask is not None else np.tile(np.arange(n), (b, 1))
        cos, sin = packed_rope(self.config, to_numpy(position_ids), [n] * b)
        mask = np.zeros((b, n), np.float32) if im_mask is None else to_numpy(im_mask).astype(np.float32)
        if mask.shape != (b, n):
            raise ValueError(f"im_mask must be [batch, length] = {(b, n)}, got {mask.shape}")
        tasks = self.use_task_loras(infer_mode)
        dt = self.compute_dtype
        hidden, states = self.model.forward(
            Tensor(embeds).astype(dt), Tensor(cos).astype(dt), Tensor(sin).astype(dt),
            Tensor(causal_mask(am, n)).astype(dt), Tensor(mask[..., None]).astype(dt), tasks,
            bool(output_hidden_states))
        normed, logits = self.model.head(hidden, Tensor(self.model.norm.weight), Tensor(self.output.weight))
        states = tuple(states) + (normed,) if output_hidden_states else None
        return CausalLMOutput(logits=logits, hidden_states=states)

    # ------------------------------------------------------------------ vision
    def vit_features(self, pixel_values) -> Tuple[Tensor, int, int]:
        """ViT last hidden states (no class token) of the global view then each tile: [1+h*w, grid^2, C]."""
        crops, h, w = self.vit_crops(pixel_values)
        return self.vit.encode(crops, self.vit_micro_batch), h, w

    def vit_crops(self, pixel_values) -> Tuple[np.ndarray, int, int]:
        """The ViT's inputs for one image: its global view then its h x w tiles, [1+h*w, 3, S, S]."""
        pv = to_numpy(pixel_values).astype(np.float32)
        tile = self.config.vision_config.image_size
        if pv.ndim != 4 or pv.shape[0] != 1 or pv.shape[1] != 3 or pv.shape[2] % tile or pv.shape[3] % tile:
            raise ValueError(f"pixel_values must be [1, 3, H, W] with H and W multiples of {tile}, got {pv.shape}")
        h, w = pv.shape[2] // tile, pv.shape[3] // tile
        tiles = pv.reshape(1, 3, h, tile, w, tile).transpose(0, 2, 4, 1, 3, 5).reshape(h * w, 3, tile, tile)
        return np.concatenate([global_view(pv, tile), tiles], axis=0), h, w

    def img2emb(self, image):
        """Normalised pixels [1, 3, H, W] -> (image embeddings [1, T, hidden], attention ones, targets -100),
        as upstream."""
        feats, h, w = self.vit_features(image)
        merged = self.merger(feats, self.plora_glb_GN, self.plora_sub_GN, h, w)
        del feats  # the ViT's features (a 4K image: 164 MB) are not held while the projector runs
        img_embeds = self.vision_proj(merged)
        n = img_embeds.shape[1]
        return img_embeds, np.ones((1, n), np.int64), np.full((1, n), -100, np.int64)

    def encode_img(self, image, hd_num=25):
        """A path (image or video), a PIL image, or normalised pixels [1, 3, H, W] -> image embeddings
        [1, T, hidden]. Unlike upstream, an unsupported file is an error, not a printed warning."""
        if image is None:
            return None
        check_image(image)
        hd_num = check_int(hd_num, "hd_num", minimum=1)
        return self.img2emb(pixel_values(image, hd_num))[0]

    # ------------------------------------------------------------------ prompts
    def interleav_wrap_chat(self, query, image, history=[], meta_instruction="", max_length=16384, hd_num=24):
        """Upstream's prompt assembly: ({'inputs_embeds': [1, L, H]}, im_mask [1, L] bool, total length).
        A number of images that does not match the `<ImageHere>` markers is an error (upstream warns and
        drops or misplaces images); one image without a marker goes first, as upstream."""
        require_tokenizer(self)
        query, image, history, hd_num = check_chat_inputs(query, image, history, hd_num, meta_instruction)
        max_length = check_int(max_length, "max_length", minimum=1)
        embeds, im_mask, temp_len = interleave_chat(
            query, image, self.tokenizer, self.embed_tokens,
            lambda img, hd: to_numpy(self.encode_img(img, hd)), history=history,
            meta_instruction=meta_instruction, max_length=max_length, hd_num=hd_num, prepare_image=pixel_values)
        return {"inputs_embeds": embeds}, im_mask, temp_len

    def build_inputs(self, tokenizer, query, history=[], meta_instruction=""):
        """Text-only prompt ids, as upstream (`'<s>' + prompt` tokenized with BOS: a double BOS)."""
        return build_inputs(tokenizer, query, history, meta_instruction)


def _is_task_lora(name: str) -> bool:
    return any(f".{t}_" in name for t in TASK_LORAS)
