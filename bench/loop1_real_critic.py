"""Loop 1 with a real LLM critic: `automem_jax.llm.server` serving the packaged
Qwen2.5-Coder-0.5B-Instruct is the critic endpoint of a short `launch.tpu_run` run, and the offline
heuristic critic on the same baseline is the peer.

    python bench/loop1_real_critic.py                    # default: room for a whole document (~15-25 min on 2 cores)
    python bench/loop1_real_critic.py --max_tokens 64    # the path only (~3-4 min)

The policy is the random tiny preset with the bootstrap off (1 eval seed, 2 steps): it never uses
memory, and that is not the point. The point is the critic path: the model's replies go through
parse_proposal, MemoryStructure.validate, the repair round and the loop's invalid-feedback round,
and the archive records what it proposed. A recording proxy between the critic and the server
keeps every request and reply exactly as they crossed the wire (it forwards bytes unchanged).

Peer: the heuristic critic runs Loop 1 in a second workdir holding a copy of the same baseline.
Ratio: valid proposals (evaluated candidates) of the real LLM against the heuristic's.

Not settable from the config, so at the library defaults: the trace digest budget (6000 tokens;
with 1 episode of 2 steps the digest is ~400 tokens), repair_rounds=1, invalid_feedback_rounds=1.
One attempt therefore costs up to 4 generations.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "pkg:qwen2.5-coder-0.5b-instruct"

# The policy side, as cheap as the launcher allows.
POLICY_OVERRIDES = {
    "bootstrap.enabled": False,
    "env.name": "crafter",  # the original game: no JAX compile for the env
    "eval.seeds": "42",
    "env.max_steps": 2,
    "env.num_envs": 1,
    "inference.max_tokens": 24,
    "loop1.revisions": 1,
    "loop1.continuation_retries": 0,
}


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---------------------------------------------------------------------------- the server

class CriticServer:
    """`python -m automem_jax.llm.server` on 127.0.0.1 (port 0: the server picks a free one and
    prints it); ready once /health answers 200. Stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, log_path: str, *, checkpoint: str = PKG, max_len: int = 8192, max_batch: int = 1,
                 request_timeout_s: float = 3600.0, start_timeout_s: float = 600.0):
        self.log_path, self.start_timeout_s = log_path, start_timeout_s
        self.cmd = [sys.executable, "-m", "automem_jax.llm.server", "--checkpoint", checkpoint, "--port", "0",
                    "--host", "127.0.0.1", "--max_batch", str(max_batch), "--max_len", str(max_len),
                    "--request_timeout_s", str(request_timeout_s)]
        self.proc: subprocess.Popen | None = None
        self.base_url = self.model = ""
        self.startup_s = 0.0

    def __enter__(self) -> "CriticServer":
        t0 = time.perf_counter()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=_env(), stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not self.base_url:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in {self.start_timeout_s:.0f} s:\n{_tail(self.log_path)}")
            for line in open(self.log_path, errors="replace"):
                if line.startswith("serving ") and " at http" in line:
                    self.model, self.base_url = line.strip()[len("serving "):].rsplit(" at ", 1)
            time.sleep(0.5)
        u = urllib.parse.urlsplit(self.base_url)
        while True:
            try:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"/health never answered 200:\n{_tail(self.log_path)}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if getattr(self, "_log", None) is not None:
            self._log.close()


def _tail(path: str, n: int = 30) -> str:
    try:
        return "".join(open(path, errors="replace").readlines()[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------- the recording proxy

class RecordingProxy:
    """127.0.0.1 proxy in front of the server that records every exchange:
    ``records``: [{method, path, request (parsed JSON body), status, response (parsed JSON), seconds}]."""

    def __init__(self, upstream_base_url: str, timeout_s: float = 3600.0):
        u = urllib.parse.urlsplit(upstream_base_url)
        self.host, self.port, self.timeout_s = u.hostname, u.port, timeout_s
        self.records: list[dict] = []
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "RecordingProxy":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                t0 = time.perf_counter()
                try:
                    conn = http.client.HTTPConnection(outer.host, outer.port, timeout=outer.timeout_s)
                    conn.request(method, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    status, ctype, data = resp.status, resp.getheader("Content-Type", "application/json"), resp.read()
                    conn.close()
                except OSError as e:
                    status, ctype = 502, "application/json"
                    data = json.dumps({"error": {"message": f"proxy: {e}", "type": "server_error"}}).encode()
                outer._record(method, self.path, body, status, data, time.perf_counter() - t0)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="critic-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _record(self, method, path, body, status, data, seconds) -> None:
        def parse(b):
            try:
                return json.loads(b) if b else None
            except ValueError:
                return b.decode("utf-8", "replace")
        with self._lock:
            self.records.append({"method": method, "path": path, "request": parse(body), "status": status,
                                 "response": parse(data), "seconds": round(seconds, 2)})

    def chats(self) -> list[dict]:
        with self._lock:
            return [r for r in self.records if r["path"].rstrip("/").endswith("/chat/completions")]


def reply_text(record: dict) -> str | None:
    """The assistant text of a recorded 200 chat reply (None otherwise)."""
    try:
        return record["response"]["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None


# ---------------------------------------------------------------------------- the launcher

def launcher_cmd(workdir: str, stages: str, overrides: dict) -> list[str]:
    return ([sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py", f"--workdir={workdir}",
             f"--stages={stages}"] + [f"--config.{k}={v}" for k, v in overrides.items()])


def run_launcher(workdir: str, stages: str, overrides: dict, log_path: str, timeout_s: float = 3600.0):
    """(exit code, seconds, command); the job's output goes to log_path."""
    cmd = launcher_cmd(workdir, stages, overrides)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    return rc, time.perf_counter() - t0, cmd


def llm_overrides(base_url: str, model: str, *, max_tokens: int, attempts: int, use_tools: bool = False,
                  timeout_s: float = 3600.0) -> dict:
    return {**POLICY_OVERRIDES, "loop1.fresh_attempts": attempts, "critic.kind": "openai",
            "critic.base_url": base_url, "critic.model": model, "critic.max_tokens": max_tokens,
            "critic.use_tools": use_tools, "critic.max_turns": 2, "critic.max_retries": 0,
            "critic.timeout_s": timeout_s}


def copy_baseline(src: str, dst: str) -> None:
    """The baseline stage's outputs, so that a second run's Loop 1 starts from the same evaluation."""
    for rel in (("eval", "baseline"), ("stages", "baseline")):
        shutil.copytree(os.path.join(src, *rel), os.path.join(dst, *rel))
    os.makedirs(os.path.join(dst, "structures"), exist_ok=True)
    shutil.copy(os.path.join(src, "structures", "v0.yaml"), os.path.join(dst, "structures", "v0.yaml"))


def read_archive(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "structures", "archive.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(x) for x in open(path) if x.strip()]


def read_json(path: str):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def loop1_seconds(workdir: str) -> float:
    return float((read_json(os.path.join(workdir, "stages", "loop1", "result.json")) or {}).get("seconds", 0.0))


def counts(rows: list[dict]) -> tuple[int, int, int]:
    """(candidates, valid = evaluated, accepted) over the candidate rows (the baseline row left out)."""
    cands = [r for r in rows if r["id"] != "v0"]
    return (len(cands), sum(r["status"] in ("accepted", "rejected") for r in cands),
            sum(r["status"] == "accepted" for r in cands))


# ---------------------------------------------------------------------------- printing

def _metric(m) -> str:
    if not m:
        return "not evaluated"
    return f"{m['average_progress']:.2f}% +- {m.get('standard_error', 0):.2f} over {m.get('episodes')} episodes"


def print_archive(title: str, workdir: str) -> None:
    print(f"\n== {title}: {os.path.join(workdir, 'structures', 'archive.jsonl')}")
    for r in read_archive(workdir):
        u = r.get("usage") or {}
        print(f"- {r['id']:8s} status={r['status']:9s} kind={r.get('kind', 'baseline')} metric: {_metric(r.get('metric'))}")
        print(f"    decision: {r.get('decision_reason')}")
        if r["id"] == "v0":
            continue
        print(f"    critic calls {u.get('calls', 0)} (repairs {u.get('repairs', 0)}), prompt tokens "
              f"{u.get('prompt_tokens', 0)}, completion tokens {u.get('completion_tokens', 0)}, "
              f"critic {r.get('seconds', {}).get('critic')} s, eval {r.get('seconds', {}).get('eval')} s, "
              f"feedback rounds {r.get('feedback_rounds')}")
        for i, err in enumerate(r.get("invalid_errors") or []):
            print(f"    error fed back (round {i + 1}): {' | '.join(err.splitlines())[:400]}")
        if r.get("diff"):
            print(f"    diff: {r['diff'][:6]}")
        if r.get("rationale"):
            print(f"    rationale: {' '.join(r['rationale'].split())[:200]}")
        print(f"    transcript: {r.get('transcript')}")
    best = read_json(os.path.join(workdir, "structures", "best.json"))
    if best:
        print(f"  best.json: version {best['version']} ({best['id']}, {best['label']}), {_metric(best['metric'])}")


def print_requests(proxy: RecordingProxy) -> None:
    print(f"\n== requests the server answered (recorded by the proxy): {len(proxy.chats())}")
    for i, r in enumerate(proxy.chats(), 1):
        usage = (r["response"] or {}).get("usage") if isinstance(r["response"], dict) else None
        fin = (r["response"] or {}).get("choices", [{}])[0].get("finish_reason") if usage else None
        text = reply_text(r)
        print(f"[{i}] HTTP {r['status']} in {r['seconds']} s; {len(r['request']['messages'])} messages; "
              + (f"prompt {usage['prompt_tokens']} + completion {usage['completion_tokens']} tokens, "
                 f"finish {fin}" if usage else f"error {str(r['response'])[:200]}"))
        if text is not None:
            print("    reply: " + json.dumps(text[:300]))
            err = reply_error(text)
            print("    parse + validate: " + ("a valid structure document" if err is None else err.splitlines()[0][:200]))


def reply_error(text: str) -> str | None:
    """parse_proposal's error for one reply (None: it holds a schema-valid document)."""
    from automem_jax.critic.protocol import ProposalError, parse_proposal
    try:
        parse_proposal(text, validate=True)
    except ProposalError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max_tokens", type=int, default=1400,
                    help="critic.max_tokens (the start structure alone is ~1070 tokens of YAML)")
    ap.add_argument("--attempts", type=int, default=1, help="loop1.fresh_attempts")
    ap.add_argument("--use_tools", action="store_true",
                    help="offer tools first (our server answers 400 and the critic falls back to the digest)")
    ap.add_argument("--max_len", type=int, default=8192, help="the server's max_len (prompt + reply)")
    ap.add_argument("--workdir", default="", help="parent folder for both runs (default: a new temp folder)")
    ap.add_argument("--no_peer", action="store_true", help="skip the heuristic peer")
    args = ap.parse_args()

    t_all = time.perf_counter()
    root = args.workdir or tempfile.mkdtemp(prefix="loop1_real_critic_")
    os.makedirs(root, exist_ok=True)
    llm_dir, heur_dir = os.path.join(root, "llm"), os.path.join(root, "heuristic")
    print(f"workdirs under {root}")
    print("policy: the random tiny preset, bootstrap off, crafter, 1 seed x 2 steps (it uses no memory; "
          "the point is the critic path)")
    with CriticServer(os.path.join(root, "server.log"), max_len=args.max_len) as srv, \
            RecordingProxy(srv.base_url) as proxy:
        print(f"critic server: {srv.model} at {srv.base_url} (ready in {srv.startup_s:.1f} s; proxy {proxy.base_url})")
        ov = llm_overrides(proxy.base_url, srv.model, max_tokens=args.max_tokens, attempts=args.attempts,
                           use_tools=args.use_tools)
        rc, llm_s, cmd = run_launcher(llm_dir, "baseline,loop1", ov, os.path.join(root, "llm.log"))
        print("command: " + " ".join(cmd))
        print(f"exit {rc} in {llm_s:.1f} s (log {os.path.join(root, 'llm.log')})")
        if rc != 0:
            print(_tail(os.path.join(root, "llm.log")))
        print_requests(proxy)
        n_requests = len(proxy.chats())
        n_docs = sum(reply_error(reply_text(r) or "") is None for r in proxy.chats())
    print(f"(server stopped; its log: {os.path.join(root, 'server.log')})")
    print_archive("real LLM critic archive", llm_dir)
    for ph in ("baseline", "loop1"):
        res = read_json(os.path.join(llm_dir, "stages", ph, "result.json"))
        if res:
            print(f"  stage {ph}: {res.get('seconds', 0):.1f} s")

    heur_s = None
    if not args.no_peer and rc == 0:
        copy_baseline(llm_dir, heur_dir)
        hov = {**POLICY_OVERRIDES, "loop1.fresh_attempts": args.attempts, "critic.kind": "heuristic"}
        hrc, heur_s, hcmd = run_launcher(heur_dir, "baseline,loop1", hov, os.path.join(root, "heuristic.log"))
        print("\npeer command: " + " ".join(hcmd))
        print(f"exit {hrc} in {heur_s:.1f} s (baseline copied from the LLM run, so only loop1 ran)")
        if hrc != 0:
            print(_tail(os.path.join(root, "heuristic.log")))
        print_archive("heuristic critic archive (same baseline)", heur_dir)

    lc, lv, la = counts(read_archive(llm_dir))
    print("\n== ratio (same baseline, same run)")
    print(f"valid proposals: real LLM {lv}/{lc} (accepted {la}; {n_docs}/{n_requests} replies held a schema-valid "
          f"document; loop1 stage {loop1_seconds(llm_dir):.1f} s)")
    if heur_s is not None:
        hc, hv, ha = counts(read_archive(heur_dir))
        print(f"                 heuristic {hv}/{hc} (accepted {ha}; loop1 stage {loop1_seconds(heur_dir):.1f} s, "
              f"its candidate's evaluation included)")
    print(f"total wall time {time.perf_counter() - t_all:.1f} s")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
