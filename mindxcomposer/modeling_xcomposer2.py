"""InternLMXComposer2ForCausalLM: the IXC2.5 model with upstream's public names.

`__call__` takes upstream's arguments (`input_ids` or `inputs_embeds`, `im_mask`, `infer_mode`, ...), does
the host-side preparation (RoPE angles, attention mask) and runs `construct`, the decoder plus output
head, which MindSpore compiles when the caller's context is GRAPH_MODE. The vision path (`img2emb`)
likewise runs its cells in whatever mode the caller chose; loading never touches the global context.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from .chat import ChatMixin
from .configuration import InternLMXComposer2Config
from .image_processing import global_view, pixel_values
from .layers import Linear, lazy_param
from .modeling_clip import CLIPVisionTower
from .modeling_internlm2 import InternLM2Model
from .ops import fused_attention_available
from .plora import INFER_MODES
from .prompt import build_inputs, interleave_chat
from .rope import rope_cos_sin
from .validation import (check_chat_inputs, check_image, check_int, check_model_dir, check_token_ids,
                         load_model_tokenizer, require_tokenizer)
from .vision import HDMerge, VisionProjector
from .weights import Checkpoint, CheckpointError, check_names_and_shapes, parameter_shapes, sizes_from_weights

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
    def __init__(self, config: InternLMXComposer2Config, dtype=ms.float32, use_fused_attention=None):
        super().__init__()
        if use_fused_attention is None:
            use_fused_attention = fused_attention_available()
        self.config = config
        self.dtype = dtype
        self.model = InternLM2Model(config, dtype, use_fused_attention)
        self.output = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        v = config.vision_config
        self.vit = CLIPVisionTower(v, dtype)
        self.vision_proj = VisionProjector(config.vision_merged_size, config.projector_hidden_size,
                                           config.hidden_size, dtype)
        self.plora_glb_GN = lazy_param((1, 1, config.vision_merged_size), dtype, "plora_glb_GN")
        self.plora_sub_GN = lazy_param((1, 1, 1, config.vision_merged_size), dtype, "plora_sub_GN")
        self.merger = HDMerge(v.image_size // v.patch_size)
        self.tokenizer = None
        self.max_length = config.max_length

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, dtype=ms.float32, use_fused_attention=None):
        """Load a model directory in the upstream Hugging Face layout (config.json + safetensors with
        upstream names) or as written by `mxc-convert`. Sizes that config.json does not carry (PLoRA rank,
        task LoRAs, projector width) are read off the weight shapes."""
        path = check_model_dir(path, dtype, use_fused_attention=use_fused_attention)
        config = InternLMXComposer2Config.from_pretrained(path)
        tokenizer = load_model_tokenizer(path)  # before the weights: a broken tokenizer.model fails fast
        ckpt = Checkpoint(path)
        for k, v in sizes_from_weights(ckpt).items():
            setattr(config, k, v)
        expected = parameter_shapes(config)
        check_names_and_shapes(expected, ckpt, path)
        model = cls(config, dtype, use_fused_attention)
        model.load_weights(ckpt)
        model.name_or_path = path
        model.tokenizer = tokenizer
        return model

    def load_weights(self, ckpt: Checkpoint) -> None:
        self.load_state_dict(ckpt.items(np.float32))

    def load_state_dict(self, items) -> None:
        """Set every parameter from (upstream name, float32 array) pairs or a dict; all must be present."""
        params = {p.name: p for p in self.get_parameters()}
        seen = set()
        for name, arr in (items.items() if isinstance(items, dict) else items):
            if name not in params:
                raise CheckpointError(f"unexpected parameter {name!r}")
            p = params[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise CheckpointError(f"{name}: checkpoint shape {tuple(arr.shape)} vs model {tuple(p.shape)}")
            p.set_data(Tensor(np.asarray(arr, np.float32)).astype(self.dtype))
            seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            raise CheckpointError(f"no value for parameters: {missing[:20]}")

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
        return self.model.tok_embeddings(ids).asnumpy()

    def construct(self, inputs_embeds, cos, sin, mask, im_mask, infer_mode="base", output_hidden_states=False):
        hidden, states = self.model(inputs_embeds, cos, sin, mask, im_mask, infer_mode, output_hidden_states)
        return self.output(hidden).astype(ms.float32), states

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
        cos, sin = rope_cos_sin(self.config, to_numpy(position_ids), seq_len=n)
        mask = np.zeros((b, n), np.float32) if im_mask is None else to_numpy(im_mask).astype(np.float32)
        if mask.shape != (b, n):
            raise ValueError(f"im_mask must be [batch, length] = {(b, n)}, got {mask.shape}")
        dt = self.dtype
        logits, states = super().__call__(
            Tensor(embeds).astype(dt), Tensor(cos).astype(dt), Tensor(sin).astype(dt),
            Tensor(causal_mask(am, n)).astype(dt), Tensor(mask[..., None]).astype(dt),
            infer_mode, bool(output_hidden_states))
        return CausalLMOutput(logits=logits, hidden_states=tuple(states) if output_hidden_states else None)

    # ------------------------------------------------------------------ vision
    def vit_features(self, pixel_values) -> Tuple[Tensor, int, int]:
        """ViT last hidden states (no class token) of the global view then each tile: [1+h*w, grid^2, C]."""
        pv = to_numpy(pixel_values).astype(np.float32)
        tile = self.config.vision_config.image_size
        if pv.ndim != 4 or pv.shape[0] != 1 or pv.shape[1] != 3 or pv.shape[2] % tile or pv.shape[3] % tile:
            raise ValueError(f"pixel_values must be [1, 3, H, W] with H and W multiples of {tile}, got {pv.shape}")
        h, w = pv.shape[2] // tile, pv.shape[3] // tile
        tiles = pv.reshape(1, 3, h, tile, w, tile).transpose(0, 2, 4, 1, 3, 5).reshape(h * w, 3, tile, tile)
        images = np.concatenate([global_view(pv, tile), tiles], axis=0)
        return self.vit(Tensor(images).astype(self.dtype)), h, w

    def img2emb(self, image):
        """Normalised pixels [1, 3, H, W] -> (image embeddings [1, T, hidden], attention ones, targets -100),
        as upstream."""
        feats, h, w = self.vit_features(image)
        merged = self.merger(feats, self.plora_glb_GN, self.plora_sub_GN, h, w)
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
