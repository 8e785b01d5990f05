import json
import os

import numpy as np
import pytest

import mindspore as ms

ms.runtime.launch_blocking()  # asynchronous launch is 10-20x slower on CPU

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
ASSETS = os.path.join(HERE, "assets")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: release-width tests (minutes, GBs of RAM)")


@pytest.fixture(params=["pynative", "graph"])
def mode(request):
    """Runs a test in PyNative and in GRAPH_MODE, restoring the caller's mode afterwards."""
    before = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE if request.param == "pynative" else ms.GRAPH_MODE)
    yield request.param
    ms.set_context(mode=before)


@pytest.fixture
def graph_mode():
    """Runs a test in GRAPH_MODE (how mxc-chat and mxc-finetune run), restoring the caller's mode afterwards."""
    before = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=before)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from mindxcomposer.demo import save_demo_model

    return save_demo_model(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    from mindxcomposer import InternLMXComposer2ForCausalLM

    return InternLMXComposer2ForCausalLM.from_pretrained(demo_dir)


# With PARITY_REPORT=path, every parity comparison is appended to that JSON-lines file: the source of
# the measured errors in docs/parity.md (`tools/parity_report.py` turns it into the table).
_REPORT = os.environ.get("PARITY_REPORT")


def assert_close(ours, ref, rel=1e-5, what=""):
    """Parity criterion of this project: max |ours - ref| <= rel * max(1, max |ref|)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max()))
    tol = rel * scale
    err = float(np.abs(ours - ref).max())
    if _REPORT:
        with open(_REPORT, "a", encoding="utf-8") as f:
            f.write(json.dumps({"what": what, "err": err, "tol": tol, "scale": scale,
                                "mode": ms.get_context("mode")}) + "\n")
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"
    return err
