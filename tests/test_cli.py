"""mxc-chat and the demo entry point, run as a user runs them (subprocesses, demo model)."""
import json
import os
import subprocess
import sys

from conftest import ASSETS, HERE

from mindxcomposer.demo import TOKENIZER_FILE, tiny_config

ROOT = os.path.dirname(HERE)


def _run(args, stdin=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mindxcomposer.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=600)


def test_one_shot_on_the_demo_model_says_weights_are_random():
    r = _run(["--image", os.path.join(ASSETS, "chelsea_tiny.png"), "--max-new-tokens", "5", "What is this?"])
    assert r.returncode == 0, r.stderr
    assert "RANDOM" in r.stderr
    assert r.stdout.strip()  # the streamed answer


def test_interactive_multi_turn_reads_until_eof():
    r = _run(["--max-new-tokens", "3", "--mode", "pynative"], stdin="Hello\nAnd now?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 2  # a prompt per turn


def test_clear_errors_for_bad_model_and_image(tmp_path):
    r = _run(["--model", str(tmp_path / "missing"), "hi"])
    assert r.returncode != 0 and "does not exist" in r.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "m" / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    (tmp_path / "m" / "tokenizer.model").write_bytes(open(TOKENIZER_FILE, "rb").read())
    r = _run(["--model", str(tmp_path / "m"), "hi"])
    assert r.returncode != 0 and "mxc-convert" in r.stderr
    r = _run(["--image", str(tmp_path / "nope.png"), "hi"])
    assert r.returncode != 0 and "nope.png" in r.stderr
