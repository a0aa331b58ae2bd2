"""Runtime LoRA adapters on the OpenAI-compatible server, vLLM's protocol: a real PEFT folder written
by hf.save_peft_adapter, loaded over HTTP, served under its own model name, unloaded."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import openai
import pytest

from automem_jax.agent.types import ChatRequest
from automem_jax.llm.engine import Engine
from automem_jax.llm.sampling import SamplingParams
from automem_jax.llm.server import serve
from automem_jax.llm.server_engines import base_model_factory, lora_engine_loader

KEY = "lora-test-key-31"
MAX_LEN = 64
MSG = [{"role": "user", "content": "hi"}]


def write_adapter(folder, seed: int = 1):
    """A PEFT adapter for preset:tiny (seed 0) with non-zero B, so it changes the model; returns
    the LoRA model it was written from."""
    import jax.numpy as jnp

    from automem_jax.models import hf, lora
    from automem_jax.models.qwen import init_model
    from automem_jax.models.qwen_presets import preset
    model = init_model(preset("tiny"), seed=0)
    lcfg = lora.LoRAConfig(rank=4, alpha=8, targets="ALL")
    lora.apply_lora(model, lcfg, seed=seed)
    rng = np.random.RandomState(seed)
    for _, layer in lora.decoder_layers(model):
        for name, (sub, _) in lora.PROJECTIONS.items():
            b = getattr(getattr(layer, sub), f"{name}_lora_b", None)
            if b is not None:
                b.set_value(jnp.asarray(0.5 * rng.randn(*b[...].shape), b[...].dtype))
    hf.save_peft_adapter(model, None, lcfg, str(folder))
    return model


def _greedy(engine, max_tokens=8):
    return engine.generate_full([ChatRequest(MSG, "plan", "policy")],
                                [SamplingParams(temperature=0, max_tokens=max_tokens)])[0]


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    from automem_jax.models import lora
    from automem_jax.models.tokenizer import load_tokenizer
    root = tmp_path_factory.mktemp("adapters")
    model = write_adapter(root / "a1")
    # The reference: an engine over the merged LoRA model, built here.
    ref_engine = Engine(lora.merge_lora(model), load_tokenizer(), max_batch=2, max_len=MAX_LEN, seed=0,
                        model_name="ref")
    ref = _greedy(ref_engine)
    del ref_engine
    base = Engine.from_preset("tiny", max_batch=4, max_len=MAX_LEN, seed=0)
    base_ref = _greedy(base)
    built = []
    load = lora_engine_loader(base, base_model_factory("preset:tiny", seed=0))

    def loader(name, path):
        built.append(load(name, path))
        return built[-1]

    handle = serve(base, api_key=KEY, adapter_loader=loader, max_loras=1)
    try:
        yield handle, root, ref, base_ref, built
    finally:
        handle.close()


def _post(handle, path, body, key=KEY):
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _error(status_text, status=400):
    status_, text = status_text
    assert status_ == status, text
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


def _client(handle):
    return openai.OpenAI(base_url=handle.base_url, api_key=KEY, max_retries=0, timeout=120)


def test_load_serve_and_unload_an_adapter(lora_server):
    handle, root, ref, base_ref, built = lora_server
    assert ref.text != base_ref.text  # the adapter changes the greedy reply
    status, text = _post(handle, "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(root / "a1")})
    assert (status, text) == (200, "Success: LoRA adapter 'a1' added successfully.")
    # Listed beside the base, vLLM-style.
    models = {m.id: m for m in _client(handle).models.list().data}
    assert set(models) == {"tiny", "a1"}
    assert models["a1"].parent == "tiny" and models["a1"].root == str(root / "a1")
    # Served with the adapter: the merged model's greedy reply; the base is unchanged.
    client = _client(handle)
    r = client.chat.completions.create(model="a1", messages=MSG, max_tokens=8, temperature=0)
    assert r.model == "a1"
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == ref.completion_tokens
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model="a1", messages=MSG, max_tokens=8, temperature=0, stream=True)
             if c.choices]
    assert "".join(parts) == ref.text
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == base_ref.text
    assert handle.stats["requests_by_model"] == {"tiny": 1, "a1": 2}
    # Refusals: the same name again, a second adapter past max_loras=1.
    err = _error(_post(handle, "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(root / "a1")}))
    assert "has already been loaded" in err["message"] and err["param"] == "lora_name"
    err = _error(_post(handle, "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": str(root / "a1")}))
    assert "max_loras is 1" in err["message"]
    # Unload: gone from the list and from serving; its engine's thread is stopped.
    assert _post(handle, "/v1/unload_lora_adapter", {"lora_name": "a1"}) == \
        (200, "Success: LoRA adapter 'a1' removed successfully.")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError, match="The model 'a1' does not exist"):
        client.chat.completions.create(model="a1", messages=MSG, max_tokens=2)
    assert len(built) == 1 and not built[0].background and not built[0].has_work
    assert handle.stats["requests_by_model"]["a1"] == 2


def test_adapter_errors_are_400s(lora_server, tmp_path):
    handle, root, *_ = lora_server
    err = _error(_post(handle, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}))
    assert "no adapter_config.json" in err["message"] and err["param"] == "lora_path"
    # A folder whose config does not match its tensors (rank 8 declared, rank 4 stored).
    bad = tmp_path / "bad"
    shutil.copytree(root / "a1", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))
    err = _error(_post(handle, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(bad)}))
    assert "cannot load LoRA adapter 'x'" in err["message"] and "expected (8," in err["message"]
    err = _error(_post(handle, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"}))
    assert err["message"] == "The lora adapter 'never-loaded' cannot be found."
    err = _error(_post(handle, "/v1/load_lora_adapter", {"lora_name": "x"}))
    assert err["param"] == "lora_path" and "required" in err["message"]
    err = _error(_post(handle, "/v1/load_lora_adapter", {"lora_name": 5, "lora_path": "p"}))
    assert err["param"] == "lora_name"
    err = _error(_post(handle, "/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": str(root / "a1")}))
    assert "already been loaded" in err["message"]  # the base model's name is taken
    status, _ = _post(handle, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "p"}, key="wrong")
    assert status == 401
    assert [m["id"] for m in json.loads(_get(handle, "/v1/models"))["data"]] == ["tiny"]
    # A server without an adapter loader (on the same engine, already in background mode).
    with serve(handle.engine, api_key=KEY) as plain:
        err = _error(_post(plain, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "a1")}))
        assert "LoRA is not enabled" in err["message"] and "--enable_lora" in err["message"]


def _get(handle, path):
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=60)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@pytest.mark.slow
def test_cli_with_enable_lora(tmp_path):
    """The CLI with vLLM's flag spellings: an adapter given at start-up (--lora-modules) answers,
    one loaded at run time is listed and unloaded, /health answers, SIGTERM exits 0."""
    from tests.test_llm_server import _wait_line
    write_adapter(tmp_path / "pre")
    env = dict(os.environ, JAX_PLATFORMS="cpu", AUTOMEM_TEST_LORA_KEY=KEY)
    cmd = [sys.executable, "-m", "automem_jax.llm.server", "--checkpoint", "preset:tiny", "--port", "0",
           "--api-key-env", "AUTOMEM_TEST_LORA_KEY", "--max_batch", "2", "--max-model-len", str(MAX_LEN),
           "--served-model-name", "tiny-cli", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "64",
           "--lora-modules", f"pre={tmp_path / 'pre'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp_path / "err.log", "w"), text=True, env=env)
    try:
        m, lines = _wait_line(proc, r"serving tiny-cli at (http://127\.0\.0\.1:\d+/v1)", time.monotonic() + 120)
        assert m, f"server did not start: {lines} {(tmp_path / 'err.log').read_text()[-3000:]}"
        client = openai.OpenAI(base_url=m.group(1), api_key=KEY, max_retries=0, timeout=120)
        assert [x.id for x in client.models.list().data] == ["tiny-cli", "pre"]
        r = client.chat.completions.create(model="pre", messages=MSG, max_tokens=4, temperature=0)
        assert r.model == "pre" and r.usage.completion_tokens >= 1
        port = int(m.group(1).rsplit(":", 1)[1].split("/")[0])
        cli = type("H", (), {"host": "127.0.0.1", "port": port})
        assert _post(cli, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(tmp_path / "pre")})[0] == 200
        assert [x.id for x in client.models.list().data] == ["tiny-cli", "pre", "rt"]
        assert _post(cli, "/v1/unload_lora_adapter", {"lora_name": "rt"}) == \
            (200, "Success: LoRA adapter 'rt' removed successfully.")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
