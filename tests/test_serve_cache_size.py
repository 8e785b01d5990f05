"""mxc-serve's default KV cache, sized to the memory left after loading the model (`serve.cache_size`)."""
import pytest

from mindxcomposer.demo import tiny_config
from mindxcomposer.serve.cache_size import (DEFAULT_MAX_BATCH, MIN_CONTEXT, MIN_RESERVE, available_memory,
                                            choose_cache, slot_bytes)

GiB = 1024 ** 3


def release_like():
    # the release's cache geometry (32 layers, 8 key/value heads of 128) with tiny other sizes
    return tiny_config(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                       max_length=16384)


def test_slot_bytes_is_keys_and_values_of_every_layer():
    c = release_like()
    assert c.head_dim == 128
    assert slot_bytes(c, 4) == 2 * 32 * 8 * 128 * 4 == 256 * 1024
    assert slot_bytes(tiny_config(), 4) == 2 * 2 * 2 * 16 * 4


def test_a_small_model_keeps_the_defaults():
    c = tiny_config()
    choice = choose_cache(c, 4, 8 * GiB)
    assert (choice.rows, choice.context) == (DEFAULT_MAX_BATCH, c.max_length + 1024) and choice.sized


def test_release_cache_on_a_24_gb_machine_fits_what_is_left():
    c = release_like()
    available = int(6.7 * GiB)  # what a 24 GB machine had after loading the release's 16 GiB of weights
    choice = choose_cache(c, 4, available)
    # the old default, 4 x 17408 fp32 slots, would need 17 GiB
    assert 4 * (c.max_length + 1024) * slot_bytes(c, 4) == 17 * GiB
    assert choice.rows >= 1 and choice.context >= MIN_CONTEXT and choice.context % 256 == 0
    kept_free = available - (choice.rows + 1) * choice.context * choice.slot_bytes
    assert kept_free >= MIN_RESERVE
    assert "chosen for 6.7 GiB available" in choice.describe()


def test_context_shrinks_before_rows():
    c = release_like()
    roomy = choose_cache(c, 4, 20 * GiB)  # 4 rows fit, with a shorter context than the default
    assert roomy.rows == 4 and MIN_CONTEXT <= roomy.context < c.max_length + 1024
    tight = choose_cache(c, 4, 7 * GiB)
    assert tight.rows < 4 and tight.context >= MIN_CONTEXT
    # bf16 arithmetic: half the bytes a slot, more slots
    assert choose_cache(c, 2, 20 * GiB).context == c.max_length + 1024


@pytest.mark.parametrize("given", [dict(max_batch=2), dict(context=8192), dict(max_batch=2, context=8192)])
def test_limits_given_are_kept(given):
    c = release_like()
    choice = choose_cache(c, 4, 6 * GiB, **given)
    if "max_batch" in given:
        assert choice.rows == given["max_batch"]
    if "context" in given:
        assert choice.context == given["context"]
    assert choice.sized == (len(given) == 1)


def test_unknown_memory_keeps_the_defaults():
    c = release_like()
    choice = choose_cache(c, 4, None)
    assert (choice.rows, choice.context, choice.sized) == (4, c.max_length + 1024, False)


def test_available_memory_is_read():
    memory = available_memory()
    assert memory is None or 0 < memory
