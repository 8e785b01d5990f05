"""Golden data for the input pipeline (images, videos, tokenizer, prompt interleaving) from upstream code.

Runs the upstream IXC2.5 files (imported at run time from --upstream, never copied) with real
torchvision, decord and transformers 4.33.2, and writes compact fixtures to tests/fixtures/inputs/:

    /work/venv-ref/bin/python tools/reference/make_input_fixtures.py --upstream /work/upstream/base

Upstream methods are called unbound on small stand-in objects, so no model is built:
- images: `encode_img` (Image.open + `Image_transform` + ToTensor/Normalize), whose `img2emb` is
  replaced by a capture; the global view comes from `CLIPVisionTower.forward` with a capturing tower;
- videos: the same `encode_img` path (decord `load_video`, `frame2img`, `Video_transform`); the label
  font is Pillow's bundled font at size 40 (what our package uses; upstream downloads SimHei). The test
  videos are lossless FFV1 AVIs written by OpenCV, which this environment lacks: --video-python names an
  interpreter with OpenCV (default: `python3` on PATH) that this script re-runs to write them;
- tokenizer: `InternLM2Tokenizer.from_pretrained(upstream dir)`;
- prompts: `interleav_wrap_chat` and `build_inputs` with an embedder whose rows are the token id and
  images encoded as constant rows.
Large arrays are stored as SHA-256 digests plus sampled grids and rows, keeping the fixtures small.
`--measure` also runs this repository's image and video code on the same inputs and prints its max
errors on the full arrays.
"""
import argparse
import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.path.join(REPO, "tests", "assets")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FOURCC = "FFV1"


# ---------------------------------------------------------------------------------------------------------
# Cases. Synthetic large images are assets upscaled by integer pixel repetition (exact, library-free).
IMAGE_CASES = (
    [dict(name=f"{a}_hd24", asset=f"{a}.png", repeat=1, hd_num=24)
     for a in ("astronaut", "chelsea", "chelsea_tiny", "coffee", "coffee_strip_1x8", "rocket_portrait",
               "rocket_strip_8x1")]
    + [dict(name="coffee_hd1", asset="coffee.png", repeat=1, hd_num=1),
       dict(name="coffee_x4_hd24", asset="coffee.png", repeat=4, hd_num=24),
       dict(name="coffee_x4_hd25", asset="coffee.png", repeat=4, hd_num=25),
       dict(name="coffee_x4_hd6", asset="coffee.png", repeat=4, hd_num=6),
       dict(name="coffee_x4_hd1", asset="coffee.png", repeat=4, hd_num=1),
       dict(name="rocket_portrait_x6_hd24", asset="rocket_portrait.png", repeat=6, hd_num=24),
       dict(name="rocket_portrait_x6_hd6", asset="rocket_portrait.png", repeat=6, hd_num=6),
       dict(name="coffee_strip_1x8_x6_hd24", asset="coffee_strip_1x8.png", repeat=6, hd_num=24),
       dict(name="coffee_strip_1x8_x6_hd6", asset="coffee_strip_1x8.png", repeat=6, hd_num=6),
       dict(name="rocket_strip_8x1_x4_hd24", asset="rocket_strip_8x1.png", repeat=4, hd_num=24)])

# Landscape frames (vertical layout), portrait frames at 2.5 fps (stride round(2.5) = 2, more than 32
# sampled positions, so the second subsampling runs), square frames (horizontal layout).
VIDEO_CASES = [
    dict(name="landscape_10fps", width=96, height=64, fps=10.0, frames=45),
    dict(name="portrait_2.5fps", width=64, height=112, fps=2.5, frames=90),
    dict(name="square_1fps", width=64, height=64, fps=1.0, frames=3),
]

GRID = 32  # canvas and pixel values are stored on every 32nd row and column, besides the canvas digest
GLOBAL_ROWS = sorted(set(range(0, 560, 56)) | {1, 558, 559})  # all 560 columns of these rows


def digest(arr):
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes()).hexdigest()


def synth_frames(width, height, count, seed):
    """Moving shapes on a gradient, integer arithmetic only."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    colors = rng.integers(0, 256, size=(3, 3))
    frames = []
    for t in range(count):
        frame = np.empty((height, width, 3), np.uint8)
        frame[..., 0] = (xx * 255) // max(width - 1, 1)
        frame[..., 1] = (yy * 255) // max(height - 1, 1)
        frame[..., 2] = (t * 37) % 256
        side = max(4, min(width, height) // 4)
        x0 = (t * 5) % max(width - side, 1)
        frame[height // 4:height // 4 + side, x0:x0 + side] = colors[0]
        cy = (t * 3) % height
        cx = width // 2
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 <= (side // 2) ** 2] = colors[1]
        frame[(xx + yy + 2 * t) % 23 == 0] = colors[2]
        frames.append(frame)
    return np.stack(frames)


# ---------------------------------------------------------------------------------------------------------
def write_video_main(argv):
    """`write-video FRAMES.npy OUT FPS FOURCC`: run under an interpreter with OpenCV."""
    import cv2

    frames_path, out, fps, fourcc = argv
    frames = np.load(frames_path)
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h))
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write {fourcc} to {out}")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    print(json.dumps({"opencv": cv2.__version__}))


def read_video_opencv(python, path):
    code = ("import cv2, numpy as np, sys\n"
            "cap = cv2.VideoCapture(sys.argv[1]); out = []\n"
            "while True:\n"
            "    ok, f = cap.read()\n"
            "    if not ok: break\n"
            "    out.append(f[..., ::-1])\n"
            "np.save(sys.argv[2], np.stack(out))\n")
    dst = path + ".cv.npy"
    subprocess.run([python, "-c", code, path, dst], check=True)
    return np.load(dst)


# ---------------------------------------------------------------------------------------------------------
def load_upstream(upstream_dir):
    pkg = types.ModuleType("ixc_upstream")
    pkg.__path__ = [os.path.abspath(upstream_dir)]
    sys.modules["ixc_upstream"] = pkg
    return types.SimpleNamespace(
        utils=importlib.import_module("ixc_upstream.ixc_utils"),
        modeling=importlib.import_module("ixc_upstream.modeling_internlm_xcomposer2"),
        mlp=importlib.import_module("ixc_upstream.build_mlp"),
        tokenization=importlib.import_module("ixc_upstream.tokenization_internlm2"),
    )


class _Captured(Exception):
    pass


def upstream_pixel_values(up, path, hd_num, font):
    """Upstream `encode_img(path, hd_num)` up to the vision tower: the canvas, pixel values, global view."""
    import torch
    from torchvision import transforms

    captured = {}
    encoder = types.SimpleNamespace(
        # The model's `vis_processor`, as its __init__ builds it.
        vis_processor=transforms.Compose([transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)]),
        font=font, device="cpu")
    original = {name: getattr(up.modeling, name) for name in ("Image_transform", "Video_transform")}

    def capture(name):
        def wrapped(img, hd_num=25):
            out = original[name](img, hd_num=hd_num)
            captured["canvas"] = np.asarray(out).copy()
            return out
        return wrapped

    def img2emb(image):
        captured["pixel_values"] = image
        return None, None, None

    encoder.img2emb = img2emb
    try:
        for name in original:
            setattr(up.modeling, name, capture(name))
        up.modeling.InternLMXComposer2ForCausalLM.encode_img(encoder, path, hd_num)
    finally:
        for name, fn in original.items():
            setattr(up.modeling, name, fn)

    def tower(x, output_hidden_states=True):
        captured["global_view"] = x[:1].clone()
        raise _Captured

    fake_tower = types.SimpleNamespace(is_loaded=True, device="cpu", dtype=torch.float32, vision_tower=tower)
    try:
        up.mlp.CLIPVisionTower.forward(fake_tower, [captured["pixel_values"]], None, None)
    except _Captured:
        pass
    return (captured["canvas"], captured["pixel_values"].numpy(), captured["global_view"].numpy())


def record(arrays, meta, key, canvas, pixel_values, global_view):
    meta.update(canvas_shape=list(canvas.shape), canvas_sha256=digest(canvas),
                pixel_values_shape=list(pixel_values.shape), grid=GRID, global_rows=GLOBAL_ROWS)
    arrays[f"{key}/canvas_grid"] = canvas[::GRID, ::GRID]
    arrays[f"{key}/pixel_grid"] = pixel_values[0][:, ::GRID, ::GRID]
    arrays[f"{key}/global_rows"] = global_view[0][:, GLOBAL_ROWS, :]


def ours():
    """This repository's package, for --measure (its image and composition code needs no OpenCV)."""
    sys.path.insert(0, REPO)
    from mindxcomposer import image_processing, video
    return image_processing, video


def measure(label, canvas, pixel_values, global_view, ours_canvas):
    """Max abs errors of our pipeline on full arrays, continuing from our own canvas."""
    from PIL import Image

    image_processing, _ = ours()
    ours_canvas = np.asarray(ours_canvas)
    if ours_canvas.shape != canvas.shape:
        print(f"  measure {label}: canvas shape {ours_canvas.shape} != upstream {canvas.shape}")
        return
    pv = image_processing.to_pixel_values(Image.fromarray(ours_canvas))
    gv = image_processing.global_view(pv)
    print(f"  measure {label}: canvas max|diff| {int(np.abs(ours_canvas.astype(int) - canvas).max())}, "
          f"pixel_values {float(np.abs(pv - pixel_values).max()):.3g}, "
          f"global view {float(np.abs(gv - global_view).max()):.3g} (max|ref| {float(np.abs(global_view).max()):.3g})")


def make_images(up, out_dir, check=False):
    from PIL import Image, ImageFont

    font = ImageFont.load_default(size=40)
    arrays, cases = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for case in IMAGE_CASES:
            src = np.asarray(Image.open(os.path.join(ASSETS, case["asset"])).convert("RGB"))
            r = case["repeat"]
            src = np.repeat(np.repeat(src, r, axis=0), r, axis=1)
            path = os.path.join(tmp, case["name"] + ".png")
            Image.fromarray(src).save(path)
            canvas, pv, gv = upstream_pixel_values(up, path, case["hd_num"], font)
            if check:
                image_processing, _ = ours()
                measure(case["name"], canvas, pv, gv, image_processing.IXCImageProcessor().canvas(path, case["hd_num"]))
            meta = dict(case, input_size=[src.shape[1], src.shape[0]])
            record(arrays, meta, case["name"], canvas, pv, gv)
            cases.append(meta)
            print(f"image {case['name']}: {src.shape[1]}x{src.shape[0]} -> canvas {canvas.shape[1]}x{canvas.shape[0]}")
    np.savez_compressed(os.path.join(out_dir, "images.npz"), **arrays)
    with open(os.path.join(out_dir, "images.json"), "w") as f:
        json.dump({"cases": cases, "font": None}, f, indent=1)


def make_videos(up, out_dir, video_python, check=False):
    import decord
    from PIL import Image, ImageFont

    font = ImageFont.load_default(size=40)
    arrays, cases = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for seed, case in enumerate(VIDEO_CASES):
            frames = synth_frames(case["width"], case["height"], case["frames"], seed)
            frames_path = os.path.join(tmp, f"{case['name']}.npy")
            np.save(frames_path, frames)
            path = os.path.join(tmp, f"{case['name']}.avi")
            info = subprocess.run([video_python, os.path.abspath(__file__), "write-video", frames_path, path,
                                   str(case["fps"]), FOURCC], check=True, capture_output=True, text=True)
            vr = decord.VideoReader(path, num_threads=1)
            decoded = np.stack([vr[i].asnumpy() for i in range(len(vr))])
            if not np.array_equal(decoded, frames):
                raise SystemExit(f"decord does not decode {path} losslessly")
            fps = float(vr.get_avg_fps())
            # Lossy codecs: do decord and OpenCV decode the same pixels? (Reported, not a fixture.)
            codec_check = {}
            for fourcc, ext in (("MJPG", "avi"), ("mp4v", "mp4")):
                lossy = os.path.join(tmp, f"{case['name']}_{fourcc}.{ext}")
                subprocess.run([video_python, os.path.abspath(__file__), "write-video", frames_path, lossy,
                                str(case["fps"]), fourcc], check=True, capture_output=True)
                vr_lossy = decord.VideoReader(lossy, num_threads=1)
                a = np.stack([vr_lossy[i].asnumpy() for i in range(len(vr_lossy))]).astype(np.int16)
                b = read_video_opencv(video_python, lossy).astype(np.int16)
                codec_check[fourcc] = (int(np.abs(a - b).max()) if a.shape == b.shape
                                       else f"frame count {len(a)} vs {len(b)}")
            canvas, pv, gv = upstream_pixel_values(up, path, 24, font)
            if check:  # our frame selection and composition on the decoded frames (OpenCV reading is tested)
                _, video = ours()
                picked = decoded[video.frame_indices(len(decoded), fps)]
                measure(case["name"], canvas, pv, gv, video.video_transform(video.frames_to_image(picked)))
            name = case["name"]
            # Frames stacked vertically in a PNG: lossless and small, unlike an npz of gradients.
            Image.fromarray(frames.reshape(-1, *frames.shape[2:])).save(
                os.path.join(out_dir, f"video_{name}_frames.png"), optimize=True)
            meta = dict(case, frames_png=f"video_{name}_frames.png", decord_fps=fps, decord_frames=len(vr),
                        codec=FOURCC, opencv=json.loads(info.stdout)["opencv"],
                        decord_vs_opencv_max_abs_diff=codec_check)
            record(arrays, meta, name, canvas, pv, gv)
            cases.append(meta)
            print(f"video {name}: {len(vr)} frames at {fps} fps -> canvas {canvas.shape[1]}x{canvas.shape[0]};"
                  f" decord vs OpenCV on lossy codecs: {codec_check}")
    np.savez_compressed(os.path.join(out_dir, "video.npz"), **arrays)
    with open(os.path.join(out_dir, "video.json"), "w") as f:
        json.dump({"cases": cases, "font": "PIL.ImageFont.load_default(size=40)"}, f, indent=1)


# ---------------------------------------------------------------------------------------------------------
HANDWRITTEN_TEXTS = [
    "", " ", "  ", "\n", "\n\n", "\t", "hello", " hello", "hello ", "  hello  world  ", "Hello, world!",
    "Hello , world . How are you ?", "I can't do it, you're right, it's fine; I'm sure we've seen it.",
    "line one\nline two\n\nline four\n", "tabs\tand\tspaces    here", "trailing newline\n",
    "你好，世界！", "浦语·灵笔 is InternLM-XComposer (浦语·灵笔).", "中文和English混合text。", "日本語のテキスト",
    "한국어 텍스트", "Привет, мир", "مرحبا بالعالم", "emoji 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family", "🙂", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
    "café naïve résumé", "e\u0301 combining", "\u3000ideographic space\u3000", "non\xa0breaking",
    "<s>", "</s>", "<unk>", "<s><s>", "<s></s><unk>", " <s> ", "a<s>b", "a <s> b", "a  <s>  b", "a\n<s>\nb",
    "<s>hello", "hello</s>", "hello </s>", "<unk> unknown", "<s> [UNUSED_TOKEN_146]user\nhi[UNUSED_TOKEN_145]\n",
    "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]user\nDescribe the image.[UNUSED_TOKEN_145]\n"
    "[UNUSED_TOKEN_146]assistant\n", " [UNUSED_TOKEN_146] ", "[UNUSED_TOKEN_1]", "[UNUSED_TOKEN_146", "<s", "s>",
    "</s", "<<s>>", "<</s>>", "<s>>", "<<unk>>", "<ImageHere>", "a<ImageHere>b", "<S>", "< s >",
    "x" * 300, "ab " * 100, "1234567890 3.14159 -42 1e10", "http://example.com/path?q=1&r=2#frag",
    "def f(x):\n    return x ** 2\n", "{\"json\": [1, 2, 3]}", "$$\\frac{a}{b}$$", "\u200b zero width \u200d",
    "\x00null", "bell\x07 and escape\x1b", "\r\n windows line", "mixed\u2028separator", "\ufeffBOM",
]


def random_texts(count, seed):
    rng = np.random.default_rng(seed)
    pieces = [
        lambda: "".join(chr(c) for c in rng.integers(32, 127, rng.integers(1, 12))),
        lambda: " " * int(rng.integers(1, 4)),
        lambda: str(rng.choice([" ", "\n", "\t", "\r", "\u3000", "\xa0", "  ", "\n\n", " \n "])),
        lambda: "".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, rng.integers(1, 6))),
        lambda: "".join(chr(c) for c in rng.integers(0x1F300, 0x1FAFF, rng.integers(1, 4))),
        lambda: str(rng.choice(["<s>", "</s>", "<unk>", "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]",
                                "<ImageHere>", "<s", "s>", "</", "<un", "[UNUSED_TOKEN_", "]"])),
        lambda: "".join(chr(c) for c in rng.integers(0x0400, 0x04FF, rng.integers(1, 6))),
        lambda: "".join(chr(c) for c in rng.integers(0x0600, 0x06FF, rng.integers(1, 6))),
        lambda: "".join(chr(c) for c in rng.integers(0xFF01, 0xFF5E, rng.integers(1, 4))),
        lambda: "".join(chr(c) for c in rng.integers(0x0300, 0x036F, rng.integers(1, 3))),
        lambda: "".join(chr(c) for c in rng.integers(1, 0xD7FF, rng.integers(1, 4))),
        lambda: str(rng.choice(["Hello", "world", " the", "image", "图片", "描述", ".", ",", "?", "!", "'s",
                                "n't", " .", " ,"])),
    ]
    texts = []
    for _ in range(count):
        n = int(rng.integers(1, 10))
        texts.append("".join(pieces[int(rng.integers(len(pieces)))]() for _ in range(n)))
    return texts


def random_id_sequences(count, seed, vocab_size):
    rng = np.random.default_rng(seed)
    special = [0, 1, 2, 92542, 92543]
    seqs = []
    for _ in range(count):
        n = int(rng.integers(1, 25))
        kind = rng.integers(0, 4, n)
        ids = np.where(kind == 0, rng.choice(special, n),
                       np.where(kind == 1, rng.integers(3, 259, n), rng.integers(0, vocab_size, n)))
        seqs.append([int(i) for i in ids])
    return seqs + [[], [1], [2], [0], [1, 1], [1, 2, 0], [92543, 92542]]


def make_tokenizer(up, upstream_dir, out_dir):
    tok = up.tokenization.InternLM2Tokenizer.from_pretrained(upstream_dir)
    texts = HANDWRITTEN_TEXTS + random_texts(360, seed=1234)
    encodings = []
    for text in texts:
        with_special = tok(text)["input_ids"]
        without = tok(text, add_special_tokens=False)["input_ids"]
        encodings.append(dict(text=text, ids=with_special, ids_no_special=without,
                              decode=tok.decode(with_special),
                              decode_skip=tok.decode(with_special, skip_special_tokens=True)))
    decodes = [dict(ids=ids, decode=tok.decode(ids), decode_skip=tok.decode(ids, skip_special_tokens=True))
               for ids in random_id_sequences(150, seed=99, vocab_size=tok.vocab_size)]
    batch_texts = ["a short one", "a much longer text that takes more tokens than the first", ""]
    batch = tok(batch_texts, padding="longest", return_tensors="np")
    with open(os.path.join(upstream_dir, "tokenizer.model"), "rb") as f:
        model_sha256 = hashlib.sha256(f.read()).hexdigest()
    data = dict(
        transformers=__import__("transformers").__version__, tokenizer_model_sha256=model_sha256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        unk_token_id=tok.unk_token_id, vocab_size=tok.vocab_size,
        special_tokens=dict(bos=tok.bos_token, eos=tok.eos_token, unk=tok.unk_token, pad=tok.pad_token),
        all_special_ids=tok.all_special_ids,
        unused_145_146=tok.convert_tokens_to_ids(["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]),
        encodings=encodings, decodes=decodes,
        batch=dict(texts=batch_texts, input_ids=batch["input_ids"].tolist(),
                   attention_mask=batch["attention_mask"].tolist()))
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(data, f, ensure_ascii=True, indent=0)
    print(f"tokenizer: {len(encodings)} texts, {len(decodes)} id sequences")


# ---------------------------------------------------------------------------------------------------------
PROMPT_CASES = [
    dict(name="one_image_no_marker", query="Describe this image.", images=[50]),
    dict(name="one_image_marker_mid", query="Look at <ImageHere> and describe it.", images=[40]),
    dict(name="one_image_marker_start", query="<ImageHere>What is this?", images=[30]),
    dict(name="one_image_marker_end", query="What is this? <ImageHere>", images=[30]),
    dict(name="two_images", query="Image1 <ImageHere>; Image2 <ImageHere>; what differs?", images=[20, 25]),
    dict(name="three_images_adjacent", query="<ImageHere><ImageHere> and <ImageHere>", images=[10, 11, 12]),
    dict(name="history_meta_one_image", query="And the colour?", images=[15],
         history=[["What is in the image?", "A cat."], ["Where is it?", "On a sofa.</s>"]], use_meta=True),
    dict(name="meta_two_images", query="Compare <ImageHere> with <ImageHere>.", images=[7, 9], use_meta=True),
    dict(name="marker_in_history", query="And now?", images=[5, 6],
         history=[["First <ImageHere>", "ok"], ["Second <ImageHere>", "fine"]]),
    dict(name="no_images", query="Just text, please.", images=[]),
    dict(name="chinese", query="请描述<ImageHere>这张图片。", images=[12]),
    dict(name="specials_and_spaces", query="  <ImageHere>  text </s> <s> more  ", images=[8]),
    dict(name="hd_num_explicit", query="<ImageHere>", images=[9], hd_num=4),
    dict(name="truncate_mid_image", query="Describe <ImageHere> please", images=[40], max_length=30),
    dict(name="truncate_mid_text", query="<ImageHere> then a rather long question that keeps going on",
         images=[10], max_length=20),
    dict(name="truncate_before_second_image", query="A <ImageHere> B <ImageHere> C", images=[20, 20],
         max_length=25),
]

BUILD_INPUTS_CASES = [
    dict(query="Hello!", history=[], use_meta=False),
    dict(query="Hello!", history=[], use_meta=True),
    dict(query="再来一次", history=[["Hi", "Hello, how can I help?"]], use_meta=False),
    dict(query=" spaces ", history=[["<s> a", "b </s>"]], use_meta=True),
]

EMBED_WIDTH = 3


def image_value(label, hd_num):
    return -(1000.0 * label + hd_num)


def make_prompts(up, upstream_dir, out_dir):
    import torch

    tok = up.tokenization.InternLM2Tokenizer.from_pretrained(upstream_dir)
    cls = up.modeling.InternLMXComposer2ForCausalLM
    meta_instruction = inspect.signature(cls.chat).parameters["meta_instruction"].default

    def embed(ids):
        return ids[..., None].float().expand(-1, -1, EMBED_WIDTH)

    def encode_img(image, hd_num):
        return torch.full((1, image, EMBED_WIDTH), image_value(image, hd_num))

    fake = types.SimpleNamespace(tokenizer=tok, device="cpu", encode_img=encode_img,
                                 model=types.SimpleNamespace(tok_embeddings=embed))
    results = []
    for case in PROMPT_CASES:
        kwargs = dict(history=case.get("history", []),
                      meta_instruction=meta_instruction if case.get("use_meta") else "")
        for key in ("max_length", "hd_num"):
            if key in case:
                kwargs[key] = case[key]
        inputs, im_mask, temp_len = cls.interleav_wrap_chat(fake, case["query"], list(case["images"]), **kwargs)
        emb = inputs["inputs_embeds"][0]
        assert bool((emb == emb[:, :1]).all())
        results.append(dict(case, values=emb[:, 0].tolist(), im_mask=im_mask[0].int().tolist(), temp_len=temp_len))
    built = []
    for case in BUILD_INPUTS_CASES:
        ids = cls.build_inputs(fake, tok, case["query"], case["history"],
                               meta_instruction if case["use_meta"] else "")["input_ids"]
        built.append(dict(case, input_ids=ids[0].tolist()))
    with open(os.path.join(out_dir, "prompt.json"), "w") as f:
        json.dump(dict(meta_instruction=meta_instruction, embed_width=EMBED_WIDTH,
                       image_value="-(1000 * image_length + hd_num)", interleave=results, build_inputs=built),
                  f, ensure_ascii=True, indent=0)
    print(f"prompts: {len(results)} interleave cases, {len(built)} build_inputs cases")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "write-video":
        return write_video_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="directory of the upstream IXC2.5 python files")
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "inputs"))
    parser.add_argument("--video-python", default="python3", help="an interpreter with OpenCV")
    parser.add_argument("--only", choices=["images", "videos", "tokenizer", "prompts"], action="append")
    parser.add_argument("--measure", action="store_true",
                        help="also print the max errors of this repository's image and video code on full arrays")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    up = load_upstream(args.upstream)
    only = set(args.only or ["images", "videos", "tokenizer", "prompts"])
    if "tokenizer" in only:
        make_tokenizer(up, args.upstream, args.out)
    if "prompts" in only:
        make_prompts(up, args.upstream, args.out)
    if "images" in only:
        make_images(up, args.out, args.measure)
    if "videos" in only:
        make_videos(up, args.out, args.video_python, args.measure)


if __name__ == "__main__":
    main()
