"""One OpenAI-compatible HTTP endpoint on the official ``openai`` SDK: what the policy client
(``llm.client.OpenAIClient``) and the critic client (``critic.client.CriticClient``) share.

* The API key comes from a NAMED environment variable, read once at construction, and lives in a
  ``Secret`` whose repr never shows it. ``api_key_env=None`` means no auth: no Authorization header
  at all is sent (the SDK only gets the placeholder ``NO_KEY``). The SDK's own environment variables
  (OPENAI_API_KEY, OPENAI_ORG_ID, OPENAI_PROJECT_ID, OPENAI_CUSTOM_HEADERS' Authorization) are
  ignored, so a key meant for one service never reaches another.
* Retries are the SDK's: connection errors, timeouts, 408/409/429 and 5xx, at most ``max_retries``
  extra attempts; other 4xx fail at once. Only the wait is ours: before retry k (0-based) it is
  ``b/2 + uniform(0, b/2)`` with ``b = min(backoff_max, backoff * 2**k)``, and at least a server's
  ``Retry-After`` / ``retry-after-ms`` (capped at ``backoff_max``; the SDK does not retry at all
  when a server asks for more than 120 s).
* Every failure becomes one ``EndpointError`` whose message names the URL, the HTTP status and the
  server's ``error.message``, always with the key redacted. Messages start with a stable prefix:

  ``connection error`` (the server could not be reached, or dropped the connection),
  ``timed out`` (no answer within ``timeout``), ``HTTP <status>`` (the server refused the request),
  ``malformed`` (a 2xx reply that is not what was asked for), ``client error`` (a local problem,
  e.g. a request that cannot be encoded). ``is_unreachable(text)`` tells the first two apart.
  A failure after retries ends with ``(gave up after N attempts)``.
* Log records of the SDK and its HTTP stack (``openai*``, ``httpx2``, ``httpcore2*``) pass through a
  filter that redacts every live key, so even a server echoing the key into a response header
  cannot put it in a DEBUG log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import httpx2
import openai

log = logging.getLogger(__name__)

NO_KEY = "EMPTY"  # what the SDK gets when no key is configured; never sent (see _SDKClient)
REDACTED = "<redacted>"

CONNECTION_ERROR = "connection error"
TIMED_OUT = "timed out"
HTTP_ERROR = "HTTP"
MALFORMED = "malformed"
CLIENT_ERROR = "client error"
UNREACHABLE_PREFIXES = (CONNECTION_ERROR, TIMED_OUT)


def is_unreachable(error: str | None) -> bool:
    """Whether an error text (an EndpointError message, or an error Completion's ``error``) says the
    server could not be reached or did not answer in time, as opposed to refusing the request."""
    return bool(error) and error.startswith(UNREACHABLE_PREFIXES)


def check_range(name: str, value, lo=None, hi=None, *, lo_open=False, integer=False, allow_none=False):
    """ValueError naming `name` unless `value` is a number (an int with integer=True) in range."""
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# The key

class Secret:
    """Holds an API key so that no repr, str, vars() dump, pickle or traceback local shows it."""

    __slots__ = ("_value", "__weakref__")

    def __init__(self, value: str):
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value
        _LIVE_SECRETS.add(self)

    def get(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, REDACTED) if self._value in text else text

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a Secret cannot be pickled")


_LIVE_SECRETS: "weakref.WeakSet[Secret]" = weakref.WeakSet()


def key_from_env(api_key_env: str | None) -> Secret | None:
    """The key in environment variable `api_key_env` (None: no auth). ValueError, naming the
    variable, when it is unset or empty."""
    if api_key_env is None:
        return None
    if not isinstance(api_key_env, str) or not api_key_env:
        raise ValueError(f"api_key_env must name an environment variable, got {api_key_env!r}")
    value = os.environ.get(api_key_env)
    if not value:
        raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set or empty; "
                         f"set it to the API key, or pass api_key_env=None for a server without auth")
    return Secret(value)


def redact(text: str, secret: Secret | None = None) -> str:
    """`text` without `secret` (default: without any live key)."""
    text = str(text)
    for s in ([secret] if secret is not None else list(_LIVE_SECRETS)):
        text = s.redact(text)
    return text


class _RedactingFilter(logging.Filter):
    """Rewrites a record that would show a live key (message, arguments or traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = [s.get() for s in list(_LIVE_SECRETS)]
        if not secrets:
            return True
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to fix
            return True
        if any(s in msg for s in secrets):
            record.msg, record.args = redact(msg), None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            if any(s in text for s in secrets):
                record.exc_text = redact(text)
        return True


# Loggers of the SDK stack (a filter on a logger sees only records made at that logger, so each
# one is named; any other one under these prefixes that exists at install time is covered too).
_SDK_LOGGERS = ("openai", "openai._base_client", "openai._response", "openai._legacy_response", "httpx2",
                "httpcore2.connection", "httpcore2.connection_pool", "httpcore2.http11", "httpcore2.http2",
                "httpcore2.proxy", "httpcore2.socks", "httpx", "httpcore")
_SDK_PREFIXES = ("openai", "httpx", "httpcore")
_FILTER = _RedactingFilter()
_FILTER_LOCK = threading.Lock()


def install_log_redaction() -> None:
    """Puts the redacting filter on the SDK stack's loggers (idempotent)."""
    with _FILTER_LOCK:
        names = set(_SDK_LOGGERS) | {n for n in list(logging.root.manager.loggerDict) if n.startswith(_SDK_PREFIXES)}
        for name in names:
            lg = logging.getLogger(name)
            if _FILTER not in lg.filters:
                lg.addFilter(_FILTER)


# ---------------------------------------------------------------------------------------------
# Errors

class EndpointError(RuntimeError):
    """A call to an OpenAI-compatible endpoint failed for good (after the SDK's retries).

    ``kind`` is the message's prefix (CONNECTION_ERROR, TIMED_OUT, HTTP_ERROR, MALFORMED,
    CLIENT_ERROR), ``status`` the HTTP status when there was one, ``endpoint`` the URL called,
    ``attempts`` how many requests were sent, ``detail`` the server's own error message (HTTP
    errors). Neither the message nor ``detail`` contains the key."""

    def __init__(self, message: str, status: int | None = None, endpoint: str = "", *, kind: str = CLIENT_ERROR,
                 attempts: int = 1, detail: str = ""):
        super().__init__(message)
        self.status, self.endpoint, self.kind, self.attempts = status, endpoint, kind, attempts
        self.detail = detail

    @property
    def unreachable(self) -> bool:
        return self.kind in UNREACHABLE_PREFIXES


def server_message(body: Any) -> str:
    """The error text of an error reply: OpenAI's ``error.message`` (or a string ``error``), vLLM's
    top-level ``message``, FastAPI's ``detail``; else the start of the body."""
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body[:300].strip()
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str) and err:
            return err[:500]
        for k in ("message", "detail"):
            if body.get(k):
                return str(body[k])[:500]
    if body is None:
        return "(no body)"
    return json.dumps(body)[:300]


# ---------------------------------------------------------------------------------------------
# The SDK client

# The private SDK methods _SDKClient overrides (requirements.txt pins the SDK version): fail at
# import, not with a key sent wrongly, if an upgrade renames one.
_OVERRIDDEN = ("_auth_headers", "_validate_headers", "_calculate_retry_timeout", "_build_request",
               "_parse_retry_after_header", "default_headers", "auth_headers")
_missing = [m for m in _OVERRIDDEN if not hasattr(openai.OpenAI, m)]
if _missing:
    raise ImportError(f"openai {openai.__version__} has no OpenAI.{', '.join(_missing)}; automem_jax.llm.openai_http "
                      f"was written against openai==3.54.0 (see requirements.txt)")

class _SDKClient(openai.OpenAI):
    """``openai.OpenAI`` with our key handling and our retry wait.

    The SDK never holds the real key: the Authorization header is built here, per request, from
    the Secret (none at all without a key), and the SDK's ambient environment variables add no
    auth, organisation or project headers. It also records, per thread, how many attempts the last
    request took (for the "gave up after N attempts" of error messages)."""

    def __init__(self, *, secret: Secret | None, backoff: float, backoff_max: float, **kw):
        self._secret = secret
        self._backoff, self._backoff_max = backoff, backoff_max
        self._tries = threading.local()
        super().__init__(api_key=NO_KEY, **kw)
        self.organization = self.project = self.admin_api_key = None
        self.webhook_secret = None

    # -- auth --
    def _key_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._secret.get()}"} if self._secret is not None else {}

    def _auth_headers(self, security) -> dict[str, str]:  # noqa: ARG002 - one key for every endpoint
        return self._key_header()

    @property
    def auth_headers(self) -> dict[str, str]:
        return self._key_header()

    def _validate_headers(self, headers, custom_headers) -> None:
        pass  # no key is a valid configuration here (a local server without auth)

    @property
    def default_headers(self):
        drop = ("authorization", "openai-organization", "openai-project")
        return {k: v for k, v in super().default_headers.items() if k.lower() not in drop}

    # -- retries --
    def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None) -> float:
        done = options.get_max_retries(self.max_retries) - remaining_retries
        b = min(self._backoff_max, self._backoff * (2.0 ** min(done, 60)))
        wait = b / 2 + random.uniform(0, b / 2)
        retry_after = self._parse_retry_after_header(response_headers)
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            wait = max(wait, min(retry_after, self._backoff_max))
        return wait

    def _build_request(self, options, *, retries_taken: int = 0):
        self._tries.n = retries_taken + 1
        return super()._build_request(options, retries_taken=retries_taken)

    def attempts(self) -> int:
        return getattr(self._tries, "n", 0)

    def reset_attempts(self) -> None:
        self._tries.n = 0


# ---------------------------------------------------------------------------------------------
# The endpoint

def _normalise_base_url(base_url) -> str:
    if not isinstance(base_url, str) or not base_url:
        raise ValueError(f"base_url must be a non-empty string, got {base_url!r}")
    url = urllib.parse.urlsplit(base_url.rstrip("/"))
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"base_url must look like http(s)://host[:port]/v1, got {base_url!r}")
    try:
        url.port
    except ValueError as e:
        raise ValueError(f"base_url {base_url!r}: {e}") from None
    out = base_url.rstrip("/")
    if out.endswith("/chat/completions"):  # accepted before: the full chat URL
        out = out[:-len("/chat/completions")]
    return out


class OpenAIEndpoint:
    """One OpenAI-compatible server: chat completions plus plain JSON calls, on the SDK.

    base_url: e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
    model: the model name sent with chat requests.
    api_key_env: the environment variable holding the key (read once, here); None sends no key.
    timeout: seconds for connecting, and for each read or write, per attempt.
    max_retries / backoff / backoff_max: see the module docstring.
    Construction raises ValueError naming the bad field; calls raise EndpointError.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout: float = 120.0,
                 max_retries: int = 2, backoff: float = 1.0, backoff_max: float = 30.0, timeout_field: str = "timeout"):
        self.base_url = _normalise_base_url(base_url)
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        check_range(timeout_field, timeout, 0, lo_open=True)
        check_range("max_retries", max_retries, 0, integer=True)
        check_range("backoff", backoff, 0)
        check_range("backoff_max", backoff_max, 0)
        self._key = key_from_env(api_key_env)
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.backoff_max = float(backoff), float(backoff_max)
        self.chat_url = self.base_url + "/chat/completions"
        # The server root: base_url without its /v1, where vLLM serves /health and /v1/... routes.
        self.server_root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        install_log_redaction()
        self._sdk = _SDKClient(secret=self._key, backoff=self.backoff, backoff_max=self.backoff_max,
                               base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, timeout={self.timeout}, max_retries={self.max_retries})")

    def close(self) -> None:
        self._sdk.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _redact(self, text: str) -> str:
        return redact(text, self._key) if self._key is not None else str(text)

    # -- calls --
    def _call(self, url: str, send: Callable[[], httpx2.Response], timeout: float | None = None) -> httpx2.Response:
        """`send()` through the SDK; every failure becomes an EndpointError with a redacted message."""
        self._sdk.reset_attempts()
        try:
            return send()
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear error
            err = self._error(e, url, self._sdk.attempts(), self.timeout if timeout is None else timeout)
        raise err from None  # outside the except: no SDK exception (holding the request) is chained

    def _error(self, e: Exception, url: str, attempts: int, timeout: float) -> EndpointError:
        status, detail = None, ""
        if isinstance(e, openai.APITimeoutError):
            kind, msg = TIMED_OUT, f"timed out after {timeout:g}s waiting for {url}"
        elif isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            what = f"{type(cause).__name__}: {cause}" if cause is not None else e.message
            kind, msg = CONNECTION_ERROR, f"connection error talking to {url}: {what}"
        elif isinstance(e, openai.APIStatusError):
            status = e.status_code
            detail = server_message(e.body if e.body is not None else e.response.text)
            kind, msg = HTTP_ERROR, f"HTTP {status} from {url}: {detail}"
        elif isinstance(e, openai.APIResponseValidationError):
            status = e.status_code
            kind, msg = MALFORMED, f"malformed reply from {url}: {e.message}"
        else:
            kind, msg = CLIENT_ERROR, f"client error calling {url}: {type(e).__name__}: {e}"
        if attempts > 1:
            msg += f" (gave up after {attempts} attempts)"
        return EndpointError(self._redact(msg), status, url, kind=kind, attempts=max(attempts, 1),
                             detail=self._redact(detail))

    def malformed(self, url: str, why: str, raw: bytes, status: int | None) -> EndpointError:
        """The error for a 2xx reply that is not a usable chat completion (subclasses check more fields)."""
        snippet = raw[:200].decode("utf-8", "replace")
        return EndpointError(self._redact(f"malformed chat completion from {url} ({why}): {snippet}"), status, url,
                             kind=MALFORMED, attempts=max(self._sdk.attempts(), 1))

    def chat_completion(self, messages: list[dict], *, extra_body: Mapping[str, Any] | None = None,
                        **params) -> dict:
        """POST {base_url}/chat/completions; the reply as a dict, checked to hold
        ``choices[0].message`` (a dict). `params` (max_tokens, temperature, top_p, stop, tools,
        tool_choice, ...) left at None are not sent; `extra_body` is merged into the body by the SDK.
        Raises EndpointError."""
        kw = {k: v for k, v in params.items() if v is not None}
        raw = self._call(self.chat_url, lambda: self._sdk.chat.completions.with_raw_response.create(
            model=self.model, messages=list(messages), extra_body=dict(extra_body) if extra_body else None,
            **kw).http_response)
        data = raw.content
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise self.malformed(self.chat_url, f"not JSON: {e}", data, raw.status_code) from None
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list) or not choices:
            raise self.malformed(self.chat_url, "no choices", data, raw.status_code)
        message = choices[0].get("message") if isinstance(choices[0], dict) else None
        if not isinstance(message, dict):
            raise self.malformed(self.chat_url, "choices[0] has no message", data, raw.status_code)
        return obj

    def _url(self, path: str) -> str:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        return self.server_root + path

    def _options(self, timeout: float | None, max_retries: int | None) -> dict:
        opts: dict[str, Any] = {}
        if timeout is not None:
            check_range("timeout", timeout, 0, lo_open=True)
            opts["timeout"] = float(timeout)
        if max_retries is not None:
            check_range("max_retries", max_retries, 0, integer=True)
            opts["max_retries"] = int(max_retries)
        return opts

    @staticmethod
    def _json_of(resp: httpx2.Response) -> dict:
        text = resp.text
        if not text.strip():
            return {}
        try:
            obj = json.loads(text)
        except ValueError:
            return {"text": text}
        return obj if isinstance(obj, dict) else {"text": text}

    def post_json(self, path: str, body: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                  max_retries: int | None = None) -> dict:
        """POST a JSON body to ``server_root + path`` (the server root is base_url without a trailing
        ``/v1``: e.g. ``post_json("/v1/load_lora_adapter", {...})``). Returns the reply's JSON object;
        an empty reply gives {} and any other reply (vLLM answers plain text here) ``{"text": ...}``.
        Same auth and retries as chat calls (`timeout`/`max_retries` override them for this call).
        Raises EndpointError (ValueError for a path without a leading '/')."""
        url, opts = self._url(path), self._options(timeout, max_retries)
        payload = dict(body or {})
        resp = self._call(url, lambda: self._sdk.post(url, cast_to=httpx2.Response, body=payload, options=opts),
                          timeout)
        return self._json_of(resp)

    def get_json(self, path: str, *, timeout: float | None = None, max_retries: int | None = None) -> dict:
        """GET ``server_root + path`` (e.g. ``get_json("/v1/models")``, ``get_json("/health")``);
        the reply as in `post_json`. Raises EndpointError."""
        url, opts = self._url(path), self._options(timeout, max_retries)
        return self._json_of(self._call(url, lambda: self._sdk.get(url, cast_to=httpx2.Response, options=opts),
                                        timeout))


def message_text(content) -> str:
    """A chat message's content as text: a string, None (""), or content parts (their text joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    raise TypeError(f"message.content is {type(content).__name__}")
