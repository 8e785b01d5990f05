"""mxc-chat and the demo entry point, run as a user runs them (subprocesses, demo model)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

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


def _start(args, tmpdir, stdin=None):
    """mxc-chat as a user starts it, with its temporary folders in `tmpdir` and Ctrl-C not ignored (a
    background job of a script would otherwise inherit SIGINT ignored)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TMPDIR=str(tmpdir))
    return subprocess.Popen([sys.executable, "-m", "mindxcomposer.cli", *args], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_output(proc, text: bytes, timeout=300):
    """Reads stdout until `text` appears (in a thread, so that a silent process fails the test instead of
    hanging it)."""
    seen = bytearray()

    def read():
        while text not in seen:
            b = proc.stdout.read(1)
            if not b:
                return
            seen.extend(b)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if text not in seen:
        proc.kill()  # not left running (nor its temporary folder) when the test fails
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"no {text!r} on stdout within {timeout} s; stderr: {err.decode(errors='replace')}")


def _interrupt(proc, times=1):
    for _ in range(times):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode(errors="replace")


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_ctrl_c_mid_generation_exits_130_and_removes_the_demo_model(tmp_path, mode):
    """In graph mode MindSpore answers Ctrl-C inside a compiled graph with SIGTERM: that, too, must end in
    cleanup and 130."""
    proc = _start(["--mode", mode, "--max-new-tokens", "3000", "Hello there"], tmp_path)
    _wait_for_output(proc, b" ")  # the streamed answer has begun
    assert os.listdir(tmp_path), "the demo model's temporary folder should exist while chatting"
    rc, err = _interrupt(proc)
    assert rc == 130, err
    assert "mxc-chat: interrupted" in err and "Traceback" not in err and "Terminated" not in err
    assert os.listdir(tmp_path) == []


def test_ctrl_c_at_the_prompt_exits_130_and_removes_the_demo_model(tmp_path):
    proc = _start(["--mode", "pynative"], tmp_path, stdin=subprocess.PIPE)
    _wait_for_output(proc, b"> ")
    rc, err = _interrupt(proc)
    assert rc == 130, err
    assert "mxc-chat: interrupted" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_repeated_ctrl_c_mid_generation_still_cleans_up_and_exits_130(tmp_path):
    """An impatient user presses Ctrl-C three times: cleanup must not be cut short, and the extra SIGTERMs
    MindSpore sends must not turn the status into 143."""
    proc = _start(["--mode", "graph", "--max-new-tokens", "3000", "Hello there"], tmp_path)
    _wait_for_output(proc, b" ")
    rc, err = _interrupt(proc, times=3)
    assert rc == 130, err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


def test_compute_dtype_flag(monkeypatch, capsys):
    """--compute-dtype bf16 loads the model with bf16 products (mxc-serve takes the same flag); a dtype
    that is not offered is a usage error."""
    from mindxcomposer import cli
    from mindxcomposer.modeling_xcomposer2 import InternLMXComposer2ForCausalLM

    loaded = []
    original = InternLMXComposer2ForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        loaded.append(model)
        return model

    monkeypatch.setattr(InternLMXComposer2ForCausalLM, "from_pretrained", classmethod(recording))
    assert cli.main(["--compute-dtype", "bf16", "--max-new-tokens", "2", "--mode", "pynative", "Hello"]) == 0
    assert [m.products for m in loaded] == ["bf16"]
    assert capsys.readouterr().out.strip()
    r = _run(["--compute-dtype", "fp16", "hi"])
    assert r.returncode == 2 and "--compute-dtype" in r.stderr
