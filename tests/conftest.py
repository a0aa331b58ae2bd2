"""Test session setup: 8 simulated CPU devices for the sharding tests, and shared tiny HF models."""

import os

# Must run before jax is imported anywhere in the session.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def hf_tiny_qwen3(tmp_path_factory):
    """A random tiny Qwen3ForCausalLM saved by transformers (untied head)."""
    return hf_fixtures.make_hf_model(tmp_path_factory.mktemp("hf_qwen3"), "qwen3", tied=False)


@pytest.fixture(scope="session")
def hf_tiny_qwen2(tmp_path_factory):
    """A random tiny Qwen2ForCausalLM saved by transformers (tied head, qkv bias)."""
    return hf_fixtures.make_hf_model(tmp_path_factory.mktemp("hf_qwen2"), "qwen2", tied=True)


@pytest.fixture(scope="session")
def gcs_emulator():
    """gcp-storage-emulator on 127.0.0.1 with bucket 'automem-test'; yields the bucket URL prefix."""
    import socket

    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="automem-test")
    server.start()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        yield "gs://automem-test"
    finally:
        server.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
