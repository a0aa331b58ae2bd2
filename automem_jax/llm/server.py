"""OpenAI-compatible HTTP server over the local Engine (FastAPI on uvicorn).

    python -m automem_jax.llm.server --checkpoint preset:tiny --port 8000
    python -m automem_jax.llm.server --checkpoint gs://bucket/export/hf --port 8000 --api_key_env KEY --enable_lora

Routes:
  ``POST /v1/chat/completions``   n=1; ``stream: true`` answers with server-sent events in OpenAI's
                                  format (``chat.completion.chunk`` objects, then ``data: [DONE]``)
  ``GET  /v1/models``             the base model and every loaded LoRA adapter
  ``GET  /health``                200 while serving (no auth, as vLLM's)
  ``POST /v1/load_lora_adapter``  ``{"lora_name", "lora_path"}``; vLLM's runtime adapter protocol
  ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``

Request bodies are pydantic models (``ChatCompletionRequest``, the LoRA ones; vLLM's field names,
unknown fields ignored), validated on the event loop and handed to ``engine.submit``. The engine runs in
background mode (``start_background()`` when serving starts, ``stop_background()`` at close): its
scheduler admits each request between decode steps, so concurrent requests join the batch already
running. A request the engine refuses (too long, bad sampling values) gets its own 400 and never
affects the others; a request whose client disconnects or that times out is cancelled, which takes
it out of the engine. Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``.

LoRA adapters (``--enable_lora`` or ``serve(adapter_loader=...)``): an adapter is a PEFT folder as
``hf.save_peft_adapter`` writes it. Loading one reloads the base weights, folds the adapter into them
(``lora.merge_lora``) and serves the result from a second ``Engine`` (same batch, length, tokenizer
and sampling defaults) beside the base one, under the adapter's name. That costs one more copy of
the weights and of the KV cache per adapter, whereas vLLM applies adapters inside one batch over
one copy of the base weights; hence the small cap (``--max_loras``, default 2).

This module starts the server (``serve``, ``ServerHandle``) and is the CLI. Its parts:
``server_schema`` (``ApiError``, the request bodies and their validation), ``server_engines`` (the
engine fronts, LoRA adapters as merged engines, ``ServerState``), ``server_http`` (the ASGI gate and
the FastAPI routes), ``server_stream`` (server-sent events of a streamed reply).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from automem_jax.llm.server_engines import EngineFront, ServerState, base_model_factory, lora_engine_loader
from automem_jax.llm.server_http import Gate, build_app
from automem_jax.llm.server_schema import ApiError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Serving

class ServerHandle:
    """A running server: ``url`` (``http://host:port``), ``base_url`` (``url + "/v1"``, for
    OpenAI clients), ``model_name``, ``engine`` (the base one), ``stats`` (requests served, also
    per model, and in flight, the most in one engine at once, and the base engine's step counts),
    ``load_adapter`` / ``unload_adapter`` (as the HTTP routes), ``close()``."""

    def __init__(self, server, thread: threading.Thread, state: ServerState, sock: socket.socket):
        self._server, self._thread, self._state = server, thread, state
        self.host, self.port = sock.getsockname()[:2]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"
        self.base_url = self.url + "/v1"
        self.model_name = state.base.name
        self.engine = state.base.engine
        self._closed = False

    @property
    def stats(self) -> dict:
        return self._state.stats()

    def load_adapter(self, name: str, path: str) -> None:
        """Loads a PEFT LoRA folder as model `name` (blocking; ApiError on refusal)."""
        self._state.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self._state.unload_adapter(name)

    def close(self, timeout: float = 30.0) -> None:
        """Stops accepting connections; requests already in the engines are answered (within
        `timeout`), later ones get 503; then stops the engines' threads this server started."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self._state.begin_close()
        # uvicorn stops listening, closes idle connections and waits for responses in progress.
        self._server.config.timeout_graceful_shutdown = max(0.1, timeout)
        self._server.should_exit = True
        self._thread.join(timeout + 5.0)
        self._state.close(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket; bound here so port 0 is resolved and a busy port raises OSError at once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    # IPv4 first where a name has both (as the stdlib server did: "localhost" is 127.0.0.1).
    family, type_, proto, _, addr = min(infos, key=lambda i: i[0] != socket.AF_INET)
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(engine, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
          api_key_env: str | None = None, served_model_name: str | None = None,
          max_body_bytes: int = 32 << 20, request_timeout_s: float = 600.0,
          adapter_loader: Callable[[str, str], Any] | None = None, max_loras: int = 2) -> ServerHandle:
    """Starts the server on a background thread (port 0 picks a free port) and returns its handle.
    The engine runs in background mode while it serves (it must not be stepped by anyone else).

    Auth: `api_key`, or the value of the environment variable `api_key_env`; neither = no auth.
    LoRA: `adapter_loader(lora_name, lora_path) -> Engine` (e.g. ``lora_engine_loader``) enables
    the adapter routes; at most `max_loras` adapters are loaded at once.
    """
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set or empty")
    for attr in ("submit", "start_background", "stop_background"):
        if not callable(getattr(engine, attr, None)):
            raise TypeError(f"serve: the engine has no {attr}(); expected automem_jax.llm.engine.Engine")
    if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
        raise ValueError(f"max_loras must be an integer >= 1, got {max_loras!r}")
    import uvicorn
    name = served_model_name or getattr(engine, "model_name", "") or "automem-policy"
    sock = _listen(host, port)
    front = EngineFront(engine, name)
    try:
        state = ServerState(front, api_key, max_body_bytes, request_timeout_s, adapter_loader, max_loras)
        config = uvicorn.Config(
            Gate(build_app(state), state), http="h11", ws="none", lifespan="off",
            log_config=None, access_log=False, proxy_headers=False, server_header=False,
            headers=[("server", "automem-jax")],
            timeout_keep_alive=120)  # the openai client keeps connections for reuse
        server = uvicorn.Server(config)
        # Signal handlers stay the caller's: uvicorn installs none off the main thread.
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60.0
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log above)")
            time.sleep(0.01)
    except BaseException:
        front.close(5.0)
        sock.close()
        raise
    return ServerHandle(server, thread, state, sock)


# ---------------------------------------------------------------------------------------------
# CLI

def _lora_modules(items: list[str] | None) -> dict[str, str]:
    """vLLM's --lora-modules: name=path items, or JSON objects {"name": ..., "path": ...}."""
    out = {}
    for item in items or []:
        if item.lstrip().startswith("{"):
            try:
                d = json.loads(item)
                name, path = d["name"], d["path"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora_modules {item!r}: expected name=path or {{\"name\": ..., \"path\": ...}}") \
                    from None
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora_modules {item!r}: expected name=path")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m automem_jax.llm.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="a local or gs:// Hugging Face folder or .gguf file, pkg:<name> (a packaged real model, e.g. pkg:qwen2.5-coder-0.5b-instruct), or preset:<name> (random weights, e.g. preset:tiny)")
    ap.add_argument("--port", type=int, required=True, help="TCP port (0 = any free port)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    ap.add_argument("--api_key_env", "--api-key-env", dest="api_key_env", default=None,
                    help="environment variable holding the bearer token clients must send (default: no auth)")
    ap.add_argument("--served_model_name", "--served-model-name", dest="served_model_name", default=None,
                    help="model id clients use (default: the engine's)")
    ap.add_argument("--max_batch", "--max-num-seqs", dest="max_batch", type=int, default=16,
                    help="KV-cache rows: sequences decoded at once")
    ap.add_argument("--max_len", "--max-model-len", dest="max_len", type=int, default=2048,
                    help="tokens per sequence, prompt + completion")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint folder)")
    ap.add_argument("--dtype", default=None, help="compute/storage dtype for HF checkpoints, e.g. bfloat16")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (and preset weights seed)")
    ap.add_argument("--max_body_bytes", type=int, default=32 << 20, help="largest accepted request body")
    ap.add_argument("--request_timeout_s", type=float, default=600.0, help="longest a request may take")
    ap.add_argument("--enable_lora", "--enable-lora", dest="enable_lora", action="store_true",
                    help="accept LoRA adapters (POST /v1/load_lora_adapter); each costs a copy of the weights")
    ap.add_argument("--max_loras", "--max-loras", dest="max_loras", type=int, default=2,
                    help="most LoRA adapters loaded at once")
    ap.add_argument("--lora_modules", "--lora-modules", dest="lora_modules", nargs="+", default=None,
                    metavar="NAME=PATH", help="adapters to load at start-up (implies --enable_lora)")
    ap.add_argument("--max_lora_rank", "--max-lora-rank", dest="max_lora_rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # vLLM's; accepted and ignored: merged adapters have no rank limit
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        print(f"error: --api_key_env {args.api_key_env}: that environment variable is not set or empty",
              file=sys.stderr)
        return 2
    try:
        modules = _lora_modules(args.lora_modules)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_loras < 1 or len(modules) > args.max_loras:
        print(f"error: --max_loras {args.max_loras}: must be >= 1 and hold the {len(modules)} --lora_modules",
              file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from automem_jax.llm.client import load_engine
    try:
        engine = load_engine(args.checkpoint, max_batch=args.max_batch, max_len=args.max_len, seed=args.seed,
                             tokenizer=args.tokenizer, dtype=args.dtype, model_name=args.served_model_name)
    except (OSError, ValueError) as e:
        print(f"error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    if stop.is_set():
        return 0
    loader = None
    if args.enable_lora or modules:
        loader = lora_engine_loader(engine, base_model_factory(args.checkpoint, seed=args.seed, dtype=args.dtype,
                                                               mesh=engine.mesh))
    try:
        handle = serve(engine, args.host, args.port, api_key_env=args.api_key_env,
                       served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes,
                       request_timeout_s=args.request_timeout_s, adapter_loader=loader, max_loras=args.max_loras)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    try:
        for name, path in modules.items():
            handle.load_adapter(name, path)
            log.info("loaded LoRA adapter %r from %s", name, path)
    except ApiError as e:
        print(f"error: --lora_modules: {e.message}", file=sys.stderr)
        handle.close()
        return 2
    # Tests and scripts parse this line for the port.
    print(f"serving {handle.model_name} at {handle.base_url}", flush=True)
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
    handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
