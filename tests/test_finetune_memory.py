"""A LoRA step's memory does not grow with depth beyond what each layer must hold: its input (kept from the
forward to the backward) and the trained adapter's gradient and AdamW moments. Measured as peak RSS of
`mxc-finetune`'s trainer in fresh processes (`benchmarks/finetune_depth_memory.py`) at two depths of a small bf16
model (hidden 512, ~2,000 positions, 2 and 8 layers).

What it can see: MindSpore's CPU allocator keeps freed memory for reuse, so resident memory is the high-water
mark of what was in use, set here by the head and loss (~2 GB over the loaded model). Something a layer's
gradient call leaves behind shows once it no longer fits in what the earlier stages freed: checked by hand,
ten layer-input-sized tensors kept per layer (320 MB at 8 layers) stay hidden, as they would in the user's
run; the bound is on the peak, which is what the run needs."""

import numpy as np

from benchmarks.finetune_depth_memory import backward_held, depth_config, measure

MiB = 2 ** 20
HIDDEN, LAYERS, WORDS = 512, (2, 8), 1500  # ~2,000 positions
LORA_R = 8
SLACK_MIB = 48  # allocator and page granularity noise between two processes


def _adapter_bytes_per_layer(config, r):
    """fp32 bytes of one layer's LoRA (A and B of the five linears)."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    shapes = [(h, h + 2 * kv), (h, h), (h, i), (i, h), (h, i)]  # (in, out): wqkv, wo, w1, w2, w3
    return sum(r * (a + b) for a, b in shapes) * 4


def test_step_peak_is_flat_in_depth(tmp_path):
    a, b = LAYERS
    results = measure(str(tmp_path), HIDDEN, LAYERS, WORDS, steps=1,
                      extra=["--lora_r", str(LORA_R), "--lora_alpha", str(2 * LORA_R)])
    ra, rb = results[a], results[b]
    assert ra["positions"] == rb["positions"] and ra["positions"] > 1500
    assert all(np.isfinite(r["losses"]).all() for r in results.values())
    # Both the step's peak and what is resident during the decoder's backward (the step's peak is set by the head
    # and loss: it hides up to ~1 GB held in the backward).
    peak_growth = (rb["step_peak_gib"] - rb["load_peak_gib"]) - (ra["step_peak_gib"] - ra["load_peak_gib"])
    held_growth = backward_held(rb) - backward_held(ra)
    layer_input = -(-ra["positions"] // 64) * 64 * HIDDEN * 4
    # Per layer: its input, the adapter's gradient and two AdamW moments.
    per_layer = layer_input + 3 * _adapter_bytes_per_layer(depth_config(HIDDEN, a), LORA_R)
    bound = (b - a) * per_layer + SLACK_MIB * MiB
    print(f"growth {a} -> {b} layers: peak {peak_growth * 1024:.1f} MiB, held in the backward {held_growth * 1024:.1f} "
          f"MiB; bound {bound / MiB:.1f} MiB", results)
    for what, growth in (("peak", peak_growth), ("resident memory in the decoder's backward", held_growth)):
        assert growth * 2 ** 30 <= bound, (f"a step's {what} grew {growth * 1024:.1f} MiB from {a} to {b} layers, "
                                           f"bound {bound / MiB:.1f} MiB ({per_layer / MiB:.2f} MiB a layer + "
                                           f"{SLACK_MIB} MiB)", results)
