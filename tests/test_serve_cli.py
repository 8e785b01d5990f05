"""`mxc-serve` as users start it: a separate process on 127.0.0.1 serving the demo model."""
import os

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_helpers import ServeProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mxc_serve_process_answers_the_openai_client():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with ServeProcess(["--max-batch", "2"], cwd=ROOT, env=env) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["mindxcomposer-demo"]
        r = client.chat.completions.create(model="mindxcomposer-demo", messages=[{"role": "user", "content": "Hi"}],
                                           temperature=0, max_tokens=4)
        assert r.usage.completion_tokens == 4 and r.choices[0].message.content
    out = server.output
    assert "demo model" in out and "RANDOM" in out  # it says that it serves the demo model
    # and the cache it holds: --max-batch kept, the demo's default context (max_length 4096 + 1024) fits
    assert "KV cache 2 row(s) x 5120 slots" in out, out
