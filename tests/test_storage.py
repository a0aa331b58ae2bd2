"""Local and gs:// (gcp-storage-emulator on 127.0.0.1) through one interface."""

import os

import pytest

from automem_jax import storage


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_read_write_list(where, tmp_path, request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("gcs_emulator") + "/storage-test"
    p = storage.join(base, "a", "b.txt")
    assert not storage.exists(p)
    storage.write_text(p, "hello")
    assert storage.exists(p) and storage.read_text(p) == "hello"
    storage.write_bytes(storage.join(base, "a", "c.bin"), b"\x00\x01")
    assert storage.listdir(storage.join(base, "a")) == ["b.txt", "c.bin"]
    assert "a" in storage.listdir(base)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "missing.txt"))
    with storage.local_file(p) as local:
        assert open(local).read() == "hello"


def test_local_write_is_atomic(tmp_path, monkeypatch):
    p = str(tmp_path / "f.txt")
    storage.write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        storage.write_text(p, "new")
    assert open(p).read() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temp file left behind


def test_bad_gcs_url():
    with pytest.raises(ValueError, match="gs://bucket/path"):
        storage.read_bytes("gs:///nobucket")
