"""Atomic outputs (`mindxcomposer.atomic`): complete or absent, a replaced output kept until the new one is in
place, and modes as the user's umask gives (0644 files / 0755 folders by default), for every writer."""
import contextlib
import os
import stat

import pytest

from mindxcomposer.atomic import atomic_dir, current_umask, file_mode, publish, readable_as_umask, write_file, write_json


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, mask):
    with umask(mask):
        assert current_umask() == mask and file_mode() == 0o666 & ~mask
        target = tmp_path / "a" / "out"
        with atomic_dir(str(target)) as tmp:
            open(os.path.join(tmp, "weights"), "w").write("x")
            library_file = os.path.join(tmp, "shard")
            open(library_file, "w").write("y")
            os.chmod(library_file, 0o400)  # as mindspore.save_checkpoint leaves its files
            readable_as_umask(library_file)
        page = write_file(str(tmp_path / "pages" / "page.html"), "<html></html>")
        write_json(str(tmp_path / "state.json"), {"step": 1})
    assert mode(target) == mode(tmp_path / "a") == 0o777 & ~mask
    for f in (target / "weights", target / "shard", page, tmp_path / "state.json"):
        assert mode(f) == 0o666 & ~mask, f
    assert open(page).read() == "<html></html>"
    assert sorted(os.listdir(tmp_path)) == ["a", "pages", "state.json"]  # no temporary left


def test_a_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    target = tmp_path / "x" / "y" / "checkpoint-7"
    with pytest.raises(RuntimeError):
        with atomic_dir(str(target)) as tmp:
            open(os.path.join(tmp, "half"), "w").write("x")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []  # the folders created on the way are gone too
    old = tmp_path / "model"
    with atomic_dir(str(old)) as tmp:
        open(os.path.join(tmp, "v"), "w").write("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(str(old)) as tmp:
            open(os.path.join(tmp, "v"), "w").write("2")
            raise RuntimeError("killed")
    assert open(old / "v").read() == "1" and os.listdir(tmp_path) == ["model"]
    with atomic_dir(str(old)) as tmp:
        open(os.path.join(tmp, "v"), "w").write("3")
    assert open(old / "v").read() == "3" and os.listdir(tmp_path) == ["model"]


def test_a_refused_replacement_keeps_the_old_output(tmp_path):
    old = tmp_path / "model"
    old.mkdir()
    (old / "v").write_text("1")
    new = tmp_path / "new"
    new.mkdir()

    def refuse():
        raise ValueError("no")

    with pytest.raises(ValueError):
        publish(str(new), str(old), refuse)
    assert (old / "v").read_text() == "1" and new.is_dir()


def test_a_failed_file_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "page.html"
    write_file(str(path), "old")

    class Boom(str):
        def encode(self, *a):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file(str(path), Boom("new"))
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["page.html"]
