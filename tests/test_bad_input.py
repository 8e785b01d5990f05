"""Bad input gets a specific, clear error before any work starts; odd images are converted correctly.

Most cases are rows of tables: `API_CASES` (calls on the demo model, each checked to fail before the
vision tower runs or a KV cache is allocated), `LOADING_CASES` (broken model directories), `CLI_CASES`
(mxc-chat arguments, run as a user runs them) and `IMAGE_MODES` (Pillow modes and the 8-bit RGB they must
give). A new case is one more row.
"""
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from conftest import ASSETS, HERE

from mindxcomposer import CLIPImageProcessor, IXCImageProcessor
from mindxcomposer.errors import (ArgumentTypeError, ConfigError, EmptyImageError, EmptyVideoError,
                                  ImageCountMismatchError, ImageTooLargeError, InputError, InputFileNotFoundError,
                                  InvalidArgumentError, InvalidTextError, MissingTokenizerError, ModelLoadError,
                                  ModelNotFoundError, TokenizerLoadError, UnreadableImageError,
                                  UnreadableVideoError, UnsupportedFormatError)
from mindxcomposer.image_processing import hd_transform, load_image, to_rgb8
from mindxcomposer.video import frame_indices, read_frames
from mindxcomposer.validation import check_images

COFFEE = os.path.join(ASSETS, "coffee.png")
CAT = os.path.join(ASSETS, "chelsea_tiny.png")
SURROGATE = "caf\udce9"  # b"caf\xe9" (Latin-1) decoded as UTF-8 with errors="surrogateescape"


# ------------------------------------------------------------------------------------------ API table
@dataclass
class Case:
    id: str
    call: Callable[[Any], Any]  # takes the context `ctx` (model, tok, tmp)
    error: type
    match: str  # regex the message must contain


def _chat(ctx, query="Hi", **kw):
    kw.setdefault("max_new_tokens", 2)
    kw.setdefault("do_sample", False)
    return ctx.model.chat(ctx.tok, query, **kw)


def _ids(ctx):
    return np.array([[1, 333, 4444]], np.int64)


API_CASES = [
    # decoding settings, which used to reach MindSpore (the KV cache was allocated first)
    Case("max_new_tokens negative", lambda c: _chat(c, max_new_tokens=-100000), InvalidArgumentError,
         r"max_new_tokens must be an integer >= 1, got -100000"),
    Case("max_new_tokens zero", lambda c: _chat(c, image=[CAT], max_new_tokens=0), InvalidArgumentError,
         r"max_new_tokens"),
    Case("max_new_tokens beyond memory", lambda c: _chat(c, max_new_tokens=10 ** 12), InvalidArgumentError,
         r"max_new_tokens=1000000000000 .* needs a KV cache of .* GB, more than this machine's"),
    Case("max_new_tokens float", lambda c: _chat(c, max_new_tokens=2.5), ArgumentTypeError,
         r"max_new_tokens must be an integer or None, got 2\.5 \(float\)"),
    Case("max_new_tokens str", lambda c: _chat(c, max_new_tokens="4"), ArgumentTypeError,
         r"max_new_tokens must be an integer or None, got '4' \(str\)"),
    Case("num_beams negative", lambda c: _chat(c, num_beams=-1), InvalidArgumentError, r"num_beams .*>= 1, got -1"),
    Case("num_beams float", lambda c: _chat(c, num_beams=2.0), ArgumentTypeError, r"num_beams must be an integer"),
    Case("num_beams bool", lambda c: _chat(c, num_beams=True), ArgumentTypeError, r"num_beams"),
    Case("temperature zero when sampling", lambda c: _chat(c, do_sample=True, temperature=0.0),
         InvalidArgumentError, r"temperature.*> 0"),
    Case("temperature nan", lambda c: _chat(c, do_sample=True, temperature=float("nan")), InvalidArgumentError,
         r"temperature .*finite"),
    Case("top_p above 1", lambda c: _chat(c, do_sample=True, top_p=1.5), InvalidArgumentError, r"top_p"),
    Case("do_sample str", lambda c: _chat(c, do_sample="False"), ArgumentTypeError, r"do_sample must be True or False"),
    Case("repetition_penalty zero", lambda c: _chat(c, repetition_penalty=0), InvalidArgumentError,
         r"repetition_penalty"),
    Case("unknown setting", lambda c: _chat(c, max_new_token=3), ArgumentTypeError,
         r"unknown generation setting.*max_new_token"),
    Case("seed str", lambda c: _chat(c, seed="7"), ArgumentTypeError, r"seed must be an integer"),
    Case("compiled str", lambda c: _chat(c, compiled="yes"), ArgumentTypeError, r"compiled must be True or False"),
    Case("streamer without put", lambda c: _chat(c, streamer=print), ArgumentTypeError, r"streamer must have put"),
    Case("infer_mode unknown", lambda c: _chat(c, infer_mode="chat"), ValueError, r"infer_mode must be one of"),
    Case("hd_num zero", lambda c: _chat(c, image=[CAT], hd_num=0), InvalidArgumentError, r"hd_num .*>= 1, got 0"),
    Case("hd_num str", lambda c: _chat(c, image=[CAT], hd_num="24"), ArgumentTypeError, r"hd_num must be an integer"),
    # prompt arguments
    Case("image a string, not a list", lambda c: _chat(c, image="x.jpg"), ArgumentTypeError,
         r"image must be a list of images .* pass image=\['x\.jpg'\]"),
    Case("image list holding None", lambda c: _chat(c, image=[None]), ArgumentTypeError,
         r"image\[0\] must be a file path"),
    Case("image list holding a number", lambda c: _chat(c, image=[CAT, 3]), ArgumentTypeError, r"image\[1\]"),
    Case("image pixel values of the wrong shape", lambda c: _chat(c, image=[np.zeros((3, 560, 560), np.float32)]),
         InvalidArgumentError, r"image\[0\]: pixel values must be float \[1, 3, H, W\]"),
    Case("image pixel values uint8", lambda c: _chat(c, image=[np.zeros((1, 3, 560, 560), np.uint8)]),
         InvalidArgumentError, r"pixel values must be float"),
    Case("image missing file", lambda c: _chat(c, image=[os.path.join(c.tmp, "none.png")]), InputFileNotFoundError,
         r"no such file"),
    Case("image text file", lambda c: _chat(c, image=[os.path.join(HERE, "conftest.py")]), UnsupportedFormatError,
         r"'\.py'"),
    Case("query bytes", lambda c: _chat(c, b"hello"), ArgumentTypeError,
         r"query must be a str, got b'hello' \(bytes\).*decode"),
    Case("query None", lambda c: _chat(c, None), ArgumentTypeError, r"query must be a str, got None"),
    Case("query lone surrogate", lambda c: _chat(c, SURROGATE), InvalidTextError,
         r"query is not valid Unicode: .*'\\udce9' at character 3"),
    Case("query lone surrogate, text only", lambda c: _chat(c, SURROGATE, image=None), InvalidTextError, r"query"),
    Case("history of strings", lambda c: _chat(c, history=["hello", "there"]), ArgumentTypeError,
         r"history\[0\] must be a \(query, response\) pair of strings, got 'hello'"),
    Case("history of two-letter strings", lambda c: _chat(c, history=["ab", "cd"]), ArgumentTypeError,
         r"history\[0\] must be a \(query, response\) pair"),
    Case("history a string", lambda c: _chat(c, history="hello"), ArgumentTypeError, r"history must be a list"),
    Case("history with surrogate", lambda c: _chat(c, history=[("a", SURROGATE)]), InvalidTextError,
         r"history\[0\]\[1\]"),
    Case("history triple", lambda c: _chat(c, history=[("a", "b", "c")]), ArgumentTypeError, r"history\[0\]"),
    Case("meta_instruction None", lambda c: _chat(c, meta_instruction=None, use_meta=True), ArgumentTypeError,
         r"meta_instruction must be a str"),
    Case("second image broken", lambda c: _chat(c, "<ImageHere>a<ImageHere>b", image=[CAT, c.junk]),
         UnreadableImageError, r"cannot decode image .*junk\.png"),
    Case("second image empty", lambda c: _chat(c, "<ImageHere>a<ImageHere>b", image=[CAT, Image.new("RGB", (0, 5))]),
         EmptyImageError, r"no pixels"),
    Case("markers and images disagree", lambda c: _chat(c, "<ImageHere><ImageHere>two", image=[CAT]),
         ImageCountMismatchError, r"2 <ImageHere> marker\(s\) but 1 image"),
    Case("tokenizer None", lambda c: c.model.chat(None, "Hi", max_new_tokens=2), MissingTokenizerError,
         r"tokenizer is None"),
    Case("tokenizer not a tokenizer", lambda c: c.model.chat("tok", "Hi", max_new_tokens=2), ArgumentTypeError,
         r"tokenizer must be an InternLM2Tokenizer"),
    # batch_chat
    Case("batch queries a string", lambda c: c.model.batch_chat(c.tok, "Hi", max_new_tokens=2), ArgumentTypeError,
         r"queries must be a list of str"),
    Case("batch queries empty", lambda c: c.model.batch_chat(c.tok, [], max_new_tokens=2), InvalidArgumentError,
         r"queries is empty"),
    Case("batch images count", lambda c: c.model.batch_chat(c.tok, ["a", "b"], images=[[CAT]], max_new_tokens=2),
         InvalidArgumentError, r"2 queries but 1 images"),
    Case("batch image not a list", lambda c: c.model.batch_chat(c.tok, ["a"], images=[CAT], max_new_tokens=2),
         ArgumentTypeError, r"image must be a list"),
    Case("batch query bytes", lambda c: c.model.batch_chat(c.tok, ["a", b"b"], max_new_tokens=2), ArgumentTypeError,
         r"queries\[1\] must be a str"),
    Case("batch num_beams", lambda c: c.model.batch_chat(c.tok, ["a"], num_beams=0), InvalidArgumentError,
         r"num_beams"),
    # write_* methods
    Case("write max_length str", lambda c: c.model.write_artical("Hi", max_length="8"), ArgumentTypeError,
         r"max_length must be an integer"),
    Case("write prompt longer than max_length", lambda c: c.model.write_artical("Hi there", max_length=3),
         InvalidArgumentError, r"max_length=3"),
    Case("write inst None", lambda c: c.model.write_artical(None), ArgumentTypeError, r"inst must be a str"),
    Case("webpage output_dir under a file",
         lambda c: c.model.write_webpage("Hi", output_dir=os.path.join(c.file, "pages"), max_new_tokens=2),
         InvalidArgumentError, r"output_dir .* is a file"),
    Case("webpage num_beams", lambda c: c.model.write_webpage("Hi", num_beams=0, output_dir=None),
         InvalidArgumentError, r"num_beams"),
    Case("resume file missing", lambda c: c.model.resume_2_webpage(os.path.join(c.tmp, "cv.md"), output_dir=None,
                                                                    max_new_tokens=2), FileNotFoundError, r"cv\.md"),
    Case("screen without image", lambda c: c.model.screen_2_webpage("", image=[], output_dir=None, max_new_tokens=2),
         ValueError, r"needs the screenshot"),
    Case("screen image a string", lambda c: c.model.screen_2_webpage("", image=CAT, output_dir=None), ArgumentTypeError,
         r"pass image=\["),
    # lower-level entry points
    Case("interleav_wrap_chat max_length", lambda c: c.model.interleav_wrap_chat("Hi", [], max_length=0),
         InvalidArgumentError, r"max_length"),
    Case("interleav_wrap_chat image string", lambda c: c.model.interleav_wrap_chat("Hi", CAT), ArgumentTypeError,
         r"image must be a list"),
    Case("encode_img hd_num", lambda c: c.model.encode_img(CAT, hd_num=-2), InvalidArgumentError, r"hd_num"),
    Case("encode_img number", lambda c: c.model.encode_img(42), ArgumentTypeError, r"image must be a file path"),
    Case("generate neither prompt", lambda c: c.model.generate(max_new_tokens=2), InvalidArgumentError,
         r"exactly one of input_ids and inputs_embeds"),
    Case("generate ids outside vocab", lambda c: c.model.generate(input_ids=[[1, 10 ** 6]], max_new_tokens=2),
         InvalidArgumentError, r"input_ids must lie in \[0, 92544\)"),
    Case("generate negative ids", lambda c: c.model.generate(input_ids=[[1, -5]], max_new_tokens=2),
         InvalidArgumentError, r"input_ids must lie in \[0, 92544\), got values from -5"),
    Case("forward float ids", lambda c: c.model(input_ids=np.array([[1.7, 2.0]])), InvalidArgumentError,
         r"input_ids must be integer ids"),
    Case("forward ids outside vocab", lambda c: c.model(input_ids=np.array([[1, 92544]])), InvalidArgumentError,
         r"input_ids must lie in"),
    Case("generate float ids", lambda c: c.model.generate(input_ids=[[1.5, 2.0]], max_new_tokens=2),
         InvalidArgumentError, r"input_ids must be integer ids"),
    Case("generate embeds width", lambda c: c.model.generate(inputs_embeds=np.zeros((1, 3, 5)), max_new_tokens=2),
         InvalidArgumentError, r"inputs_embeds must be numbers \[rows, length, 64\]"),
    Case("generate mask shape", lambda c: c.model.generate(input_ids=_ids(c), attention_mask=np.ones((1, 2)),
                                                           max_new_tokens=2), InvalidArgumentError, r"attention_mask"),
    Case("generate max_new_tokens", lambda c: c.model.generate(input_ids=_ids(c), max_new_tokens=-1),
         InvalidArgumentError, r"max_new_tokens"),
    Case("generate stopping_criteria", lambda c: c.model.generate(input_ids=_ids(c), max_new_tokens=2,
                                                                  stopping_criteria=[3]), ArgumentTypeError,
         r"stopping_criteria\[0\] must be callable"),
    Case("tokenizer lone surrogate", lambda c: c.tok.encode(SURROGATE), InvalidTextError, r"text is not valid Unicode"),
]


@pytest.fixture
def ctx(demo_model, tmp_path, monkeypatch):
    """The demo model with its vision tower and KV-cache allocation watched: a bad argument must be reported
    before either runs."""
    class Ctx:
        pass

    c = Ctx()
    c.model, c.tok, c.tmp = demo_model, demo_model.tokenizer, str(tmp_path)
    c.file = str(tmp_path / "a_file")
    open(c.file, "w").close()
    c.junk = str(tmp_path / "junk.png")
    with open(c.junk, "wb") as f:
        f.write(b"not a png at all" * 10)
    c.work = []
    monkeypatch.setattr(demo_model, "img2emb", lambda *a, **k: c.work.append("vision tower"))
    import mindxcomposer.chat as chat_module

    monkeypatch.setattr(chat_module, "ModelSession", lambda *a, **k: c.work.append("KV cache"))
    monkeypatch.chdir(tmp_path)  # write_webpage's default output_dir is "."
    return c


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_rejects_before_any_work(ctx, case):
    with pytest.raises(case.error, match=case.match):
        case.call(ctx)
    assert ctx.work == [], f"{case.id}: {ctx.work} ran before the error"


def test_error_classes_are_the_builtin_ones_users_catch():
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidTextError, InputError)
    assert issubclass(MissingTokenizerError, ValueError)
    assert issubclass(ModelNotFoundError, FileNotFoundError) and issubclass(ConfigError, OSError)
    assert issubclass(ConfigError, ValueError) and issubclass(TokenizerLoadError, ModelLoadError)


def test_valid_arguments_still_run(demo_model):
    """The checks accept what upstream accepts: numpy integers, tuples, [query, response] lists, seed -1."""
    response, history = demo_model.chat(demo_model.tokenizer, "Hi", image=(CAT,), max_new_tokens=np.int64(2),
                                        num_beams=np.int32(1), do_sample=np.bool_(False), history=[["a", "b"]],
                                        seed=-1)
    assert isinstance(response, str) and history[-1] == ("Hi", response)
    import mindspore as ms

    pixels = IXCImageProcessor()(CAT, hd_num=1)
    from_array = demo_model.encode_img(pixels)
    np.testing.assert_array_equal(demo_model.encode_img(ms.Tensor(pixels)).asnumpy(), from_array.asnumpy())


def test_prompt_cut_at_max_length_warns_once_naming_both_lengths(demo_model, caplog):
    with caplog.at_level(logging.WARNING, logger="mindxcomposer"):
        _, _, n = demo_model.interleav_wrap_chat("Hello there, how are you today?", [])
        assert not caplog.records
        inputs, _, n = demo_model.interleav_wrap_chat("Hello there, how are you today?", [], max_length=6)
    assert inputs["inputs_embeds"].shape[1] == 6
    cut = [r for r in caplog.records if "max_length" in r.getMessage()]
    assert len(cut) == 1, caplog.text
    assert f"{n} tokens" in cut[0].getMessage() and "max_length=6" in cut[0].getMessage()


# ------------------------------------------------------------------------------------------ loading table
def _model_copy(demo_dir, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    for name in os.listdir(demo_dir):
        if name.endswith(".safetensors"):
            os.symlink(os.path.join(demo_dir, name), d / name)  # 48 MB: linked, not copied
        else:
            shutil.copyfile(os.path.join(demo_dir, name), d / name)
    return d


def _drop_config_key(key):
    def edit(d):
        import json

        cfg = json.loads((d / "config.json").read_text())
        del cfg[key]
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


LOADING_CASES = [
    ("config.json without hidden_size", _drop_config_key("hidden_size"), ConfigError,
     r"config\.json has no hidden_size"),
    ("config.json without num_key_value_heads", _drop_config_key("num_key_value_heads"), ConfigError,
     r"no num_key_value_heads"),
    ("config.json a list", lambda d: (d / "config.json").write_text("[1, 2]"), ConfigError, r"expected a JSON object"),
    ("config.json hidden_size str", lambda d: (d / "config.json").write_text('{"hidden_size": "64"}'), ConfigError,
     r"has no vocab_size"),
    ("garbage tokenizer.model", lambda d: (d / "tokenizer.model").write_bytes(b"\x00garbage" * 100), TokenizerLoadError,
     r"tokenizer\.model is not a SentencePiece model"),
    ("no config.json", lambda d: os.remove(d / "config.json"), ModelNotFoundError, r"no config\.json"),
    ("vision_config.json not JSON", lambda d: (d / "vision_config.json").write_text("{oops"), ConfigError,
     r"vision_config\.json is not a usable CLIP config"),
    ("tokenizer_config.json not JSON", lambda d: (d / "tokenizer_config.json").write_text("[oops"), TokenizerLoadError,
     r"tokenizer_config\.json is not valid JSON"),
]


@pytest.mark.parametrize("edit,error,match", [c[1:] for c in LOADING_CASES], ids=[c[0] for c in LOADING_CASES])
def test_loading_errors(demo_dir, tmp_path, edit, error, match):
    from mindxcomposer import InternLMXComposer2ForCausalLM

    d = _model_copy(demo_dir, tmp_path)
    edit(d)
    with pytest.raises(error, match=match):
        InternLMXComposer2ForCausalLM.from_pretrained(str(d))


@pytest.mark.parametrize("path,kwargs,error,match", [
    (42, {}, ArgumentTypeError, r"path must be a model directory"),
    ("/nonexistent/model", {}, ModelNotFoundError, r"does not exist"),
    (COFFEE, {}, ModelNotFoundError, r"is a file"),
    (ASSETS, {"dtype": "int8"}, InvalidArgumentError, r"dtype must be one of"),
    (ASSETS, {"use_fused_attention": "no"}, ArgumentTypeError, r"use_fused_attention must be True or False"),
], ids=["path int", "missing dir", "a file", "dtype unknown name", "use_fused_attention str"])
def test_from_pretrained_arguments(path, kwargs, error, match):
    from mindxcomposer import InternLMXComposer2ForCausalLM

    with pytest.raises(error, match=match):
        InternLMXComposer2ForCausalLM.from_pretrained(path, **kwargs)


def test_missing_tokenizer_warns_at_load_and_chat_names_the_file(demo_dir, tmp_path, caplog):
    from mindxcomposer import InternLMXComposer2ForCausalLM

    d = _model_copy(demo_dir, tmp_path)
    os.remove(d / "tokenizer.model")
    with caplog.at_level(logging.WARNING, logger="mindxcomposer"):
        model = InternLMXComposer2ForCausalLM.from_pretrained(str(d))
    assert model.tokenizer is None and "has no tokenizer.model" in caplog.text
    for call in (lambda: model.chat(model.tokenizer, "Hi"), lambda: model.write_artical("Hi"),
                 lambda: model.interleav_wrap_chat("Hi", [])):
        with pytest.raises(MissingTokenizerError, match=r"tokenizer is None \(its directory .* has no "
                                                        r"tokenizer\.model"):
            call()


# ------------------------------------------------------------------------------------------ CLI table
def _run_chat(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mindxcomposer.cli", *args], capture_output=True, env=env,
                          timeout=600, **kw)


def _zero_png(tmp):
    path = os.path.join(tmp, "zero.png")
    open(path, "wb").close()
    return path


def _config_only(tmp):
    import json

    from mindxcomposer.demo import tiny_config

    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(tiny_config().to_dict(), f)
    return tmp


# (id, argv given the tmp dir, regex of the one error line); all fail before the model loads
CLI_CASES = [
    ("empty image file", lambda t: ["--image", _zero_png(t), "hi"], r"cannot decode image .*zero\.png"),
    ("max-new-tokens 0", lambda t: ["--max-new-tokens", "0", "hi"], r"max_new_tokens must be an integer >= 1, got 0"),
    ("num-beams -1", lambda t: ["--num-beams", "-1", "hi"], r"num_beams must be an integer >= 1, got -1"),
    ("temperature 0 when sampling", lambda t: ["--do-sample", "--temperature", "0", "hi"], r"temperature"),
    ("top-p 2", lambda t: ["--do-sample", "--top-p", "2", "hi"], r"top_p"),
    ("hd-num 0", lambda t: ["--hd-num", "0", "hi"], r"hd_num must be an integer >= 1"),
    ("seed -5", lambda t: ["--seed", "-5", "hi"], r"seed must be an integer >= -1"),
    ("query not UTF-8", lambda t: [b"caf\xe9"], r"query is not valid Unicode"),
    ("model missing", lambda t: ["--model", os.path.join(t, "nope"), "hi"], r"model directory .* does not exist"),
    ("model without config.json", lambda t: ["--model", t, "hi"], r"no config\.json in"),
    ("model without tokenizer", lambda t: ["--model", _config_only(t), "hi"], r"no tokenizer\.model in"),
    ("image missing", lambda t: ["--image", os.path.join(t, "nope.png"), "hi"], r"no such file: .*nope\.png"),
    ("two images, no markers", lambda t: ["--image", CAT, "--image", CAT, "hi"],
     r"0 <ImageHere> marker\(s\) but 2 image\(s\)"),
]


@pytest.mark.parametrize("argv,match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_errors_are_one_line(tmp_path, argv, match):
    r = _run_chat(argv(str(tmp_path)))
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, err
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("mxc-chat")]
    assert len(ours) == 1 and ours[0].startswith("mxc-chat: error: "), err
    import re

    assert re.search(match, ours[0]), ours[0]


def test_cli_debug_shows_the_traceback():
    r = _run_chat(["--debug", "--max-new-tokens", "0", "hi"])
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" in err and "mxc-chat: error: max_new_tokens" in err


def test_cli_interactive_bad_text_is_reported_and_the_session_goes_on():
    r = _run_chat(["--max-new-tokens", "2", "--mode", "pynative"], input=b"caf\xe9\nHello\n")
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, err
    assert "mxc-chat: error: query is not valid Unicode" in err and "Traceback" not in err
    assert r.stdout.count(b"> ") >= 3  # the bad turn, the good one, then the end


# ------------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def processor():
    return IXCImageProcessor()


def _gray(shape=(64, 96)):
    """A grey ramp 0..255 over the image."""
    return (np.arange(np.prod(shape)).reshape(shape) * 255 // (np.prod(shape) - 1)).astype(np.uint8)


def _palette_with_transparency():
    img = Image.fromarray(_gray()).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 3
    palette = np.asarray(img.getpalette(), np.uint8).reshape(-1, 3)
    return img, Image.fromarray(palette[np.asarray(img)])  # every pixel its palette colour, index 3 too


# (mode, image, the 8-bit RGB image it must become)
def _image_modes():
    g = _gray()
    rgb = Image.fromarray(g).convert("RGB")
    color = Image.open(os.path.join(ASSETS, "chelsea_tiny.png")).convert("RGB")
    c = np.asarray(color)
    alpha = np.full(c.shape[:2] + (1,), 90, np.uint8)
    p, p_rgb = _palette_with_transparency()
    return [
        ("I;16 scaled, not clipped", Image.fromarray(g.astype(np.uint16) * 257), rgb),
        ("I;16B", Image.fromarray((g.astype(np.uint16) * 257).astype(">u2")), rgb),
        ("I with 16-bit values", Image.fromarray(g.astype(np.int32) * 257), rgb),
        ("I with 8-bit values", Image.fromarray(g.astype(np.int32)), rgb),
        ("F in [0, 1]", Image.fromarray(g.astype(np.float32) / 255), rgb),
        ("F in [0, 255]", Image.fromarray(g.astype(np.float32)), rgb),
        ("L", Image.fromarray(g), rgb),
        ("LA alpha dropped", Image.fromarray(np.dstack([g, g // 2])), rgb),
        ("La alpha dropped", Image.fromarray(np.dstack([g, np.full_like(g, 255)])).convert("La"), rgb),
        ("RGBA alpha dropped", Image.fromarray(np.concatenate([c, alpha], -1)), color),
        ("P with transparency", p, p_rgb),
        ("PA", p.convert("PA"), p_rgb),
        ("1", Image.fromarray(g > 127), Image.fromarray(np.where(g > 127, 255, 0).astype(np.uint8)).convert("RGB")),
        ("CMYK", color.convert("CMYK"), color.convert("CMYK").convert("RGB")),
    ]


IMAGE_MODES = _image_modes()


@pytest.mark.parametrize("image,expected", [m[1:] for m in IMAGE_MODES], ids=[m[0] for m in IMAGE_MODES])
def test_every_mode_becomes_8bit_rgb(processor, image, expected):
    out = to_rgb8(image)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    np.testing.assert_array_equal(processor(image), processor(expected))


def test_16bit_png_file_keeps_its_range(processor, tmp_path):
    """A full-range 16-bit gradient was 99.5% white after Pillow's clipping conversion."""
    ramp = np.linspace(0, 65535, 256 * 64).reshape(64, 256).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    gray = np.asarray(load_image(str(path)))[..., 0]
    np.testing.assert_array_equal(gray, ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert (gray == 255).mean() < 0.01 and abs(gray.mean() - 127.5) < 1


def test_lab_goes_through_colour_management():
    grey = to_rgb8(Image.new("LAB", (2, 2), (128, 128, 128)))  # L 50 %, a = b = 0: a neutral mid grey
    r, g, b = grey.getpixel((0, 0))
    assert r == g == b and 110 < r < 130


def test_missing_file(processor, tmp_path):
    for name in ("missing.png", "missing.mp4"):
        with pytest.raises(InputFileNotFoundError, match="no such file") as info:
            processor(str(tmp_path / name))
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    for name in ("folder.png", "folder.mp4", "folder"):  # a directory is named as one, whatever its name
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(InputFileNotFoundError, match="is a directory"):
            processor(str(folder))
        with pytest.raises(InputFileNotFoundError, match="is a directory"):
            check_images([str(folder)])
    with pytest.raises(InputFileNotFoundError, match="is a directory"):
        read_frames(str(tmp_path / "folder.mp4"))


def test_unsupported_extension(processor, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="'.txt'"):
        processor(str(path))
    with pytest.raises(UnsupportedFormatError, match="none"):
        load_image(str(tmp_path / "no_extension"))


def test_unreadable_and_truncated_images(processor, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png" * 20)
    with pytest.raises(UnreadableImageError, match="junk.png"):
        processor(str(junk))
    data = open(COFFEE, "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="truncated.png"):
        processor(str(truncated))


def test_zero_sized_and_degenerate_images(processor):
    with pytest.raises(EmptyImageError, match="no pixels"):
        processor(Image.new("RGB", (0, 7)))
    with pytest.raises(EmptyImageError, match="aspect ratio"):
        hd_transform(Image.new("RGB", (2000, 1)), hd_num=1)  # 560 / 2000 rounds down to 0 rows
    with pytest.raises(ValueError, match="hd_num"):
        processor(COFFEE, hd_num=0)
    with pytest.raises(TypeError):
        processor(42)


def test_decompression_bomb_limit_is_an_error(processor, monkeypatch):
    pixels = Image.open(COFFEE).size[0] * Image.open(COFFEE).size[1]
    # Just above the limit Pillow itself only warns; far above it raises. Both are errors here.
    for limit in (pixels - 1, pixels // 4):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS|decompression|exceeds"):
            processor(COFFEE)
        with pytest.raises(ImageTooLargeError):
            processor(Image.new("RGB", (600, 400)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert processor(COFFEE).shape == (1, 3, 1120, 1120)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1"])
def test_non_rgb_files_are_converted(processor, mode, tmp_path):
    img = Image.open(os.path.join(ASSETS, "chelsea.png")).convert(mode)
    path = tmp_path / f"image_{mode}.png"
    img.save(path)
    np.testing.assert_array_equal(processor(str(path)), processor(to_rgb8(img)))


def test_rgba_alpha_is_dropped_not_composited(processor):
    rgb = np.asarray(Image.open(COFFEE).convert("RGB"))
    alpha = np.zeros(rgb.shape[:2] + (1,), np.uint8)  # fully transparent
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")
    np.testing.assert_array_equal(processor(rgba), processor(COFFEE))


def test_clip_processor_bad_inputs():
    clip = CLIPImageProcessor()
    with pytest.raises(EmptyImageError):
        clip(Image.new("RGB", (5, 0)))
    with pytest.raises(ValueError, match="uint8"):
        clip(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="shortest_edge"):
        CLIPImageProcessor(size={"height": 5, "width": 5})
    with pytest.raises(InputFileNotFoundError):
        CLIPImageProcessor.from_pretrained("/nonexistent/dir")


def test_video_errors(processor, tmp_path):
    cv2 = pytest.importorskip("cv2")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    with pytest.raises(UnreadableVideoError, match="junk.mp4"):
        processor(str(junk))
    empty = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"FFV1"), 5.0, (64, 64))
    writer.release()
    with pytest.raises(EmptyVideoError, match="no decodable frames"):
        read_frames(str(empty))
    for fps in (0.4, 0.0, float("nan")):
        with pytest.raises(UnreadableVideoError, match="frame rate"):
            frame_indices(10, fps)
    for err in (EmptyVideoError, UnreadableVideoError):
        assert issubclass(err, InputError) and issubclass(err, ValueError)
