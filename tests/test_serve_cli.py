"""`mxc-serve` as users start it: a separate process on 127.0.0.1 serving the demo model."""
import os
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mxc_serve_process_answers_the_openai_client():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "mindxcomposer.serve.cli", "--port", str(port), "--max-batch", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mxc-serve did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["mindxcomposer-demo"]
        r = client.chat.completions.create(model="mindxcomposer-demo", messages=[{"role": "user", "content": "Hi"}],
                                           temperature=0, max_tokens=4)
        assert r.usage.completion_tokens == 4 and r.choices[0].message.content
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "demo model" in out and "RANDOM" in out  # it says that it serves the demo model
    # and the cache it holds: --max-batch kept, the demo's default context (max_length 4096 + 1024) fits
    assert "KV cache 2 row(s) x 5120 slots" in out, out
