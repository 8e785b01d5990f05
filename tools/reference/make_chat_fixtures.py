"""Golden token ids of upstream `chat` / `write_*` on the tiny demo model: tests/fixtures/chat/.

    /work/venv-ref/bin/python tools/reference/make_chat_fixtures.py --upstream /work/upstream/base

Every case calls an upstream method (`chat`, `write_artical`, `write_webpage`, `screen_2_webpage`,
`resume_2_webpage`) with deterministic decoding on a freshly loaded upstream model (tiny config, seed 0,
built by `upstream.py`): upstream's dynamic-NTK RoPE keeps its scaled base across calls, our port does
not. The model's `generate` is wrapped to record, for every call the method makes, its arguments, the
prompt it was given (length, image-token runs, text token ids) and the full returned sequence.

Random weights make gibberish, and a decision won by a hair could flip under float32 differences
between torch and MindSpore. Each case is therefore run again with every step's scores perturbed by
seeded uniform noise of +-NOISE * max(1, max |scores|); the ids must not change (asserted), and the
smallest greedy top-1/top-2 margin is recorded. The test video is the `square_1fps` one of
tests/fixtures/inputs (its frames PNG), written as lossless FFV1 by OpenCV under --video-python (this
venv has no OpenCV) through `make_input_fixtures.py write-video`, and stored here beside the resume
`resume_2_webpage` reads (RESUME_TEXT below).
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import tempfile

import numpy as np
import torch

import upstream as U
from make_input_fixtures import digest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(REPO, "tests", "fixtures", "chat")
SEED = 0
NOISE = 1e-4
NOISE_SEEDS = (1, 2)
EOA = 92542  # [UNUSED_TOKEN_145]

# Upstream moves tensors to the GPU unconditionally (`chat(image=None)`, `get_stopping_criteria`).
torch.Tensor.cuda = lambda self, *args, **kwargs: self

CHELSEA = "tests/assets/chelsea_tiny.png"
ROCKET_STRIP = "tests/assets/rocket_strip_8x1.png"
VIDEO = "tests/fixtures/chat/square_1fps.avi"
RESUME = "tests/fixtures/chat/resume.md"
VIDEO_SOURCE = dict(frames_png="tests/fixtures/inputs/video_square_1fps_frames.png", inputs_case="square_1fps",
                    frames=3, width=64, height=64, fps=1.0, codec="FFV1")

HISTORY = [["Hello, who are you?", "I am an assistant that looks at pictures."]]
# Lengths for the NTK cases: the image takes 841 tokens; the words fill the prompt to just past 1024
# (scaled RoPE from the prefill on) or to 1014 (scaled from the 11th decoding step on).
LONG_WORDS = ("Look closely at every part of the picture, the colours, the shapes, the light and the "
              "shadows, the textures of the surfaces and what they suggest about the place and the time "
              "of day. ").split()


def long_query(words):
    return " ".join((LONG_WORDS * 20)[:words]) + " Now describe the picture."


CASES = [
    dict(name="image_greedy", method="chat",
         args=dict(query="Describe this image in detail.", image=[CHELSEA], do_sample=False, num_beams=1,
                   max_new_tokens=24)),
    dict(name="image_beams3", method="chat",
         args=dict(query="Describe this image in detail.", image=[CHELSEA], do_sample=False, num_beams=3,
                   max_new_tokens=24)),
    dict(name="two_images_greedy", method="chat",
         args=dict(query="Image 1: <ImageHere>; Image 2: <ImageHere>. What differs between them?",
                   image=[CHELSEA, ROCKET_STRIP], do_sample=False, num_beams=1, max_new_tokens=16)),
    dict(name="two_images_beams3", method="chat",
         args=dict(query="Image 1: <ImageHere>; Image 2: <ImageHere>. What differs between them?",
                   image=[CHELSEA, ROCKET_STRIP], do_sample=False, num_beams=3, max_new_tokens=16)),
    dict(name="text_history_greedy", method="chat",
         args=dict(query="Tell me a short story about a lighthouse.", image=None, history=HISTORY, do_sample=False,
                   num_beams=1, max_new_tokens=32)),
    dict(name="text_history_beams3", method="chat",
         args=dict(query="Tell me a short story about a lighthouse.", image=None, history=HISTORY, do_sample=False,
                   num_beams=3, max_new_tokens=32)),
    dict(name="text_empty_image_list_greedy", method="chat",
         args=dict(query="Tell me a short story about a lighthouse.", image=[], history=HISTORY, do_sample=False,
                   num_beams=1, max_new_tokens=32)),
    dict(name="video_greedy", method="chat",
         args=dict(query="What happens in this video?", image=[VIDEO], do_sample=False, num_beams=1,
                   max_new_tokens=16)),
    dict(name="ntk_prefill_greedy", method="chat",
         args=dict(query=long_query(160), image=[CHELSEA], do_sample=False, num_beams=1, max_new_tokens=24)),
    dict(name="ntk_prefill_beams3", method="chat",
         args=dict(query=long_query(160), image=[CHELSEA], do_sample=False, num_beams=3, max_new_tokens=24)),
    dict(name="ntk_cross_greedy", method="chat",
         args=dict(query=long_query(138), image=[CHELSEA], do_sample=False, num_beams=1, max_new_tokens=24)),
    dict(name="ntk_cross_beams3", method="chat",
         args=dict(query=long_query(138), image=[CHELSEA], do_sample=False, num_beams=3, max_new_tokens=24)),
    dict(name="use_meta_greedy", method="chat",
         args=dict(query="Describe this image in detail.", image=[CHELSEA], do_sample=False, num_beams=1,
                   max_new_tokens=24, use_meta=True)),
    dict(name="write_artical_text", method="write_artical", new_tokens=24,
         args=dict(inst="Write an article about the history of coffee.", image=[], do_sample=False,
                   num_beams=1)),
    dict(name="write_artical_image", method="write_artical", new_tokens=16,
         args=dict(inst="Write a story about this cat.", image=[CHELSEA], do_sample=False, num_beams=1)),
    dict(name="write_webpage", method="write_webpage",
         args=dict(inst="A personal homepage for a photographer, with a gallery and a contact form.", image=[],
                   do_sample=False, num_beams=2, repetition_penalty=3.0, max_new_tokens=24)),
    dict(name="screen_2_webpage", method="screen_2_webpage",
         args=dict(inst="", image=[CHELSEA], do_sample=False, num_beams=2, repetition_penalty=3.0,
                   max_new_tokens=16)),
    dict(name="resume_2_webpage", method="resume_2_webpage",
         args=dict(inst=RESUME, image=[], do_sample=False, num_beams=2, repetition_penalty=3.0,
                   max_new_tokens=16)),
]
HTML_FILES = {"write_webpage": "Instruction-aware_Webpage_Generation.html",
              "screen_2_webpage": "Screenshot-to-Webpage.html",
              "resume_2_webpage": "Resume-to-Personal_Page.html"}

RESUME_TEXT = """# Ada Example

Software engineer, Shanghai.

## Experience
- 2021-2024: built image search at a small start-up.
- 2019-2021: data pipelines for a weather service.

## Skills
Python, C++, SQL, cooking.
"""


class Noise:
    """Seeded uniform noise on every step's scores: a decision it flips is too close for parity."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids, scores):
        scale = NOISE * scores.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
        return scores + scale * (2 * torch.rand(scores.shape, generator=self.gen) - 1)


def runs(mask):
    """[[is_image, length], ...] of a boolean row."""
    out = []
    for v in mask.tolist():
        if out and out[-1][0] == int(v):
            out[-1][1] += 1
        else:
            out.append([int(v), 1])
    return out


def text_ids_of(model, embeds, mask):
    """Token ids of the text rows of inputs_embeds, found by exact match in the embedding table."""
    table = model.model.tok_embeddings.weight.detach()
    rows = embeds[0][~mask[0]]
    ids = torch.cdist(rows, table).argmin(dim=1)
    if not torch.equal(table[ids], rows):
        raise RuntimeError("a text row of inputs_embeds is not a row of the embedding table")
    return ids.tolist()


def describe_kwargs(kwargs):
    out = {}
    for k, v in kwargs.items():
        if k in ("inputs_embeds", "input_ids", "attention_mask", "im_mask", "streamer"):
            continue
        if k == "stopping_criteria":
            v = [[s.tolist() for s in c.stops] for c in v]
        out[k] = v
    return out


def recording_generate(model, calls, noise_seed):
    original = model.generate

    def generate(*args, **kwargs):
        assert not args and "logits_processor" not in kwargs
        rec = {"kwargs": describe_kwargs(kwargs)}
        mask = kwargs["im_mask"]
        if "inputs_embeds" in kwargs:
            embeds = kwargs["inputs_embeds"]
            rec.update(input="inputs_embeds", input_len=embeds.shape[1], im_mask_runs=runs(mask[0]),
                       text_ids=text_ids_of(model, embeds, mask))
        else:
            ids = kwargs["input_ids"]
            assert not mask.any() and kwargs["attention_mask"].all()
            rec.update(input="input_ids", input_len=ids.shape[1], input_ids=ids[0].tolist())
        extra = {}
        if noise_seed is not None:
            from transformers.generation import LogitsProcessorList
            extra["logits_processor"] = LogitsProcessorList([Noise(noise_seed)])
        out = original(**kwargs, **extra, return_dict_in_generate=True, output_scores=True)
        seq = out.sequences[0].tolist()
        prefix = 1 if rec["input"] == "inputs_embeds" else rec["input_len"]
        if rec["input"] == "inputs_embeds":
            assert seq[0] == model.config.bos_token_id  # transformers 4.33 starts the sequence with <s>
        new = seq[prefix:]
        rec.update(sequence=seq, leading_tokens=prefix, new_ids=new, num_new=len(new),
                   distinct_new=len(set(new)))
        if kwargs.get("num_beams", 1) > 1:
            rec["sequences_score"] = float(out.sequences_scores[0])
        else:
            top2 = torch.stack([s[0].topk(2).values for s in out.scores])
            rec["greedy_top1_scores"] = top2[:, 0].tolist()
            rec["greedy_min_margin"] = float((top2[:, 0] - top2[:, 1]).min())
        rope = model.model.layers[0].attention.rotary_emb
        rec["rope_max_seq_len_cached_after"] = int(rope.max_seq_len_cached)
        calls.append(rec)
        return out.sequences

    return generate


@contextlib.contextmanager
def working_dir(path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def call_args(model, case):
    """The arguments passed to the upstream method: repository-relative paths made absolute."""
    args = dict(case["args"])
    if args.get("image"):
        args["image"] = [os.path.join(REPO, p) for p in args["image"]]
    if case["method"] == "resume_2_webpage":
        args["inst"] = os.path.join(REPO, args["inst"])
    if case["method"] == "chat":
        args = dict(tokenizer=model.tokenizer, **args)
    return args


def run_case(upstream_dir, config, case, noise_seed=None):
    model = U.load_upstream(upstream_dir, config, SEED)
    calls = []
    model.generate = recording_generate(model, calls, noise_seed)
    with tempfile.TemporaryDirectory() as tmp, working_dir(tmp):
        result = getattr(model, case["method"])(**call_args(model, case))
        html = HTML_FILES.get(case["method"])
        html_content = None
        if html is not None:
            with open(html, encoding="utf-8") as f:
                html_content = f.read()
        leftovers = sorted(set(os.listdir(tmp)) - {html})
        assert not leftovers, leftovers
    if case["method"] == "chat":
        response, history = result
        out = dict(response=response, history=[list(h) for h in history])
    else:
        out = dict(returned=result, html_file=html, html_content=html_content)
    return out, calls


def prompt_length(upstream_dir, config, case):
    """write_artical's own prompt length (`interleav_wrap_chat`, whose hd_num it does not pass)."""
    model = U.load_upstream(upstream_dir, config, SEED)
    args = call_args(model, case)
    with torch.no_grad():
        _, _, n = model.interleav_wrap_chat(args["inst"], args["image"], max_length=16384)
    return n


def stop_reason(call):
    new = call["new_ids"]
    # The webpage methods pass no eos_token_id: generate falls back to the model's, </s> (2).
    eos = call["kwargs"].get("eos_token_id", 2)
    eos = eos if isinstance(eos, list) else [eos]
    if new and new[-1] in eos:
        return "eos"
    if new and "stopping_criteria" in call["kwargs"] and [new[-1]] in call["kwargs"]["stopping_criteria"][0]:
        return "stop_word"
    return "max_new_tokens"


def make_video(video_python):
    from PIL import Image
    import decord

    src = VIDEO_SOURCE
    frames = np.asarray(Image.open(os.path.join(REPO, src["frames_png"])).convert("RGB"))
    frames = frames.reshape(src["frames"], src["height"], src["width"], 3)
    path = os.path.join(REPO, VIDEO)
    with tempfile.TemporaryDirectory() as tmp:
        npy = os.path.join(tmp, "frames.npy")
        np.save(npy, frames)
        info = subprocess.run([video_python, os.path.join(os.path.dirname(__file__), "make_input_fixtures.py"),
                               "write-video", npy, path, str(src["fps"]), src["codec"]],
                              check=True, capture_output=True, text=True)
    vr = decord.VideoReader(path, num_threads=1)
    if not np.array_equal(np.stack([vr[i].asnumpy() for i in range(len(vr))]), frames):
        raise SystemExit(f"decord does not decode {path} losslessly")
    return dict(src, file=os.path.basename(VIDEO), bytes=os.path.getsize(path),
                opencv=json.loads(info.stdout)["opencv"], decord_fps=float(vr.get_avg_fps()))


def check_video_canvas(upstream_dir, video):
    """The video's upstream canvas is the one tests/fixtures/inputs checks our video code against."""
    up = U.import_upstream(upstream_dir)
    canvas = up.ixc_utils.Video_transform(
        up.ixc_utils.frame2img(up.ixc_utils.load_video(os.path.join(REPO, VIDEO)), U.local_font()), hd_num=24)
    with open(os.path.join(REPO, "tests", "fixtures", "inputs", "video.json")) as f:
        expected = {c["name"]: c for c in json.load(f)["cases"]}[video["inputs_case"]]["canvas_sha256"]
    got = digest(np.asarray(canvas))
    if got != expected:
        raise SystemExit(f"video canvas {got} differs from tests/fixtures/inputs ({expected})")
    return got


def versions():
    import PIL
    import decord
    import torchvision
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "decord": decord.__version__, "torch_threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="directory of the upstream IXC2.5 python files")
    parser.add_argument("--video-python", default="python3", help="an interpreter with OpenCV")
    parser.add_argument("--only", action="append", help="case names to run (for trying prompts; cases.json is not written)")
    args = parser.parse_args()
    from mindxcomposer.demo import tiny_config

    config = tiny_config()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(REPO, RESUME), "w", encoding="utf-8") as f:
        f.write(RESUME_TEXT)
    video = make_video(args.video_python)
    video["canvas_sha256"] = check_video_canvas(args.upstream, video)

    cases = []
    for case in CASES:
        if args.only and case["name"] not in args.only:
            continue
        case = json.loads(json.dumps(case))
        if case["method"] == "write_artical":
            case["args"]["max_length"] = prompt_length(args.upstream, config, case) + case.pop("new_tokens")
        result, calls = run_case(args.upstream, config, case)
        for seed in NOISE_SEEDS:
            _, noisy = run_case(args.upstream, config, case, noise_seed=seed)
            changed = [i for i, (a, b) in enumerate(zip(calls, noisy)) if a["new_ids"] != b["new_ids"]]
            if changed:
                raise SystemExit(f"{case['name']}: noise seed {seed} changes the ids of generate call(s) {changed}:"
                                 f" {[calls[i]['new_ids'] for i in changed]} vs {[noisy[i]['new_ids'] for i in changed]}")
        for call in calls:
            call["stopped_by"] = stop_reason(call)
        cases.append(dict(case, result=result, generate_calls=calls))
        print(f"{case['name']}: " + "; ".join(
            f"input {c['input_len']} ({c['input']}), {c['num_new']} new ({c['distinct_new']} distinct), "
            f"{c['stopped_by']}, rope cache {c['rope_max_seq_len_cached_after']}"
            + (f", min margin {c['greedy_min_margin']:.3g}" if "greedy_min_margin" in c else
               f", score {c['sequences_score']:.4f}") for c in calls), flush=True)
    if args.only:
        return
    doc = dict(
        command="/work/venv-ref/bin/python tools/reference/make_chat_fixtures.py --upstream <IXC2.5 code dir>",
        versions=versions(), config=config.to_dict(), seed=SEED,
        generation_config={k: getattr(U.load_upstream(args.upstream, config, SEED).generation_config, k)
                           for k in ("bos_token_id", "eos_token_id", "pad_token_id", "max_length")},
        noise_check=dict(amplitude=f"{NOISE} * max(1, max|scores|) per step, uniform", seeds=list(NOISE_SEEDS),
                         result="no case's ids change"),
        video=video, resume=os.path.basename(RESUME), cases=cases)
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
