"""A small OpenAI-compatible HTTP server that injects faults, for the corpus tests and benchmark.

It answers ``POST /v1/chat/completions`` (and ``GET /v1/models``) from a *script*:

    {"delay": 0.0,                      # seconds every request sleeps (the benchmark's fixed delay)
     "model": "fault-model-v1",         # the model id it reports (differs from the one asked for)
     "default": {"content": "#### 0"},  # reply when no item matches
     "items": {"[P3]": {                # an item matches when its key occurs in the user message
         "solve":   {"content": "... #### 7", "reasoning_content": "...", "finish_reason": "stop"},
         "judge":   {"content": "VERDICT: CORRECT"},
         "rewrite": {"content": "... #### 7"},
         "faults":  ["429", "500", "empty", "slow", "drop"]}}}   # one per attempt, then normal replies

``"models"`` sets what ``GET /v1/models`` answers: ``"list"`` (default, the model id above),
``"empty_body"`` (200 with no body, as ``mlx_lm server`` without ``--model`` can), ``"empty_list"``
or ``"404"``. ``max_active`` is the most requests it ever had in flight at once.

The request kind is recognised from the prompt text: "CORRECT or INCORRECT" -> judge,
"SCORE: <1-5>" -> critic, "Rewrite" -> rewrite, else solve. ``faults`` are consumed per (item, kind) in order:
``429`` (with Retry-After: 0), ``401`` (echoing the key, as real servers do), ``400``, ``404``, ``500``, ``503``, ``empty`` (200 with no choices),
``empty_body`` (200 with an empty body), ``empty_content`` (200, content "" and no finish
reason), ``slow`` (sleeps ``slow_s`` then answers, for the client timeout), ``drop`` (closes
the connection without answering). A reply with ``"echo_think": true`` puts the reasoning inline as ``<think>...</think>`` in the content,
the way some servers do. Every request is logged in ``server.log`` (kind, key, fault).

``kill()`` stops it the way a crash does: the listening socket is closed (new connections are
refused) and every open connection is reset, requests in flight included (what a pool must
survive). ``stop()`` is the polite shutdown.

Run standalone (the benchmark does): ``python tests/fault_server.py --port 8123 --delay 0.5``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    def __init__(self, script: dict | None = None, host: str = "127.0.0.1", port: int = 0):
        self.script = script or {}
        self.lock = threading.Lock()
        self.attempts: dict = defaultdict(int)
        self.log: list[dict] = []
        self.counts = Counter()
        self.conns: set = set()  # open client connections (kill() resets them)
        self.dead = False
        self.active = self.max_active = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK = +40 ms

            def log_message(self, *a):  # quiet
                pass

            def setup(self):
                super().setup()
                with owner.lock:
                    owner.conns.add(self.connection)

            def finish(self):
                with owner.lock:
                    owner.conns.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def do_GET(self):
                mode = owner.script.get("models", "list")
                if mode == "empty_body":
                    return self._send(200, None, raw=b"")
                if mode == "404":
                    return self._send(404, None, raw=b"Not Found")
                data = [] if mode == "empty_list" else [{"id": owner.script.get("model", "fault-model-v1"),
                                                         "object": "model"}]
                self._send(200, {"object": "list", "data": data})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                with owner.lock:
                    owner.active += 1
                    owner.max_active = max(owner.max_active, owner.active)
                try:
                    owner.handle(self, body)
                finally:
                    with owner.lock:
                        owner.active -= 1

            def _send(self, code, obj, headers=None, raw: bytes | None = None):
                if owner.dead:  # killed while this request slept: no answer, ever
                    self.close_connection = True
                    return
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 512  # the default backlog of 5 refuses connections at concurrency 128

            def handle_error(self, request, client_address):  # a client that timed out and left: expected
                import sys

                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self.httpd = Server((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self.thread: threading.Thread | None = None

    # -- behaviour
    @staticmethod
    def kind_of(text: str) -> str:
        if "CORRECT or INCORRECT" in text:
            return "judge"
        if "SCORE: <1-5>" in text:
            return "critic"
        if "Rewrite" in text:
            return "rewrite"
        return "solve"

    def handle(self, h, body: dict) -> None:
        msgs = body.get("messages") or [{"role": "user", "content": body.get("prompt", "")}]
        text = "\n".join(str(m.get("content", "")) for m in msgs if m.get("role") != "system")
        kind = self.kind_of(text)
        key = next((k for k in self.script.get("items", {}) if k in text), None)
        item = self.script.get("items", {}).get(key, {}) if key else {}
        with self.lock:
            attempt = self.attempts[(key, kind)]
            self.attempts[(key, kind)] += 1
            faults = item.get("faults", []) if kind == "solve" else item.get(f"{kind}_faults", [])
            fault = faults[attempt] if attempt < len(faults) else None
            self.counts[fault or "ok"] += 1
            self.log.append({"kind": kind, "key": key, "fault": fault, "t": time.time()})
        if self.script.get("delay"):
            time.sleep(self.script["delay"])
        if fault == "429":
            return h._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": "0"})
        if fault == "401":  # like real servers, echo the key it was given
            key = (h.headers.get("Authorization") or "").replace("Bearer ", "")
            return h._send(401, {"error": {"message": f"Incorrect API key provided: {key}", "type": "auth"}})
        if fault in ("400", "404"):  # a client error (unknown model ...): not worth a retry
            return h._send(int(fault), {"error": {"message": f"HTTP {fault}: model not found", "type": "invalid"}})
        if fault in ("500", "503"):
            return h._send(int(fault), {"error": {"message": "server error"}})
        if fault == "empty":
            return h._send(200, {"id": "x", "object": "chat.completion", "model": "m", "choices": []})
        if fault == "empty_content":
            return h._send(200, {"id": "x", "object": "chat.completion", "model": "m",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        if fault == "empty_body":
            return h._send(200, None, raw=b"")
        if fault == "drop":
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if fault == "slow":
            time.sleep(self.script.get("slow_s", 3.0))
        reply = dict(self.script.get("default", {"content": "#### 0"}))
        reply.update(item.get(kind, {}))
        content = reply.get("content", "")
        msg = {"role": "assistant", "content": content}
        if reply.get("reasoning_content") is not None:
            if reply.get("echo_think"):
                msg["content"] = f"<think>{reply['reasoning_content']}</think>{content}"
            else:
                msg["reasoning_content"] = reply["reasoning_content"]
        ntok = max(1, len((content + (reply.get("reasoning_content") or "")).split()))
        h._send(200, {"id": f"chatcmpl-{attempt}", "object": "chat.completion", "created": int(time.time()),
                      "model": self.script.get("model", "fault-model-v1"),
                      "choices": [{"index": 0, "message": msg, "finish_reason": reply.get("finish_reason", "stop")}],
                      "usage": {"prompt_tokens": max(1, len(text.split())), "completion_tokens": ntok,
                                "total_tokens": ntok + max(1, len(text.split()))}})

    # -- lifecycle
    def start(self) -> "FaultServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kill(self) -> None:
        """Die like a crashed process: refuse new connections, reset the open ones (in-flight requests
        never get an answer)."""
        import socket

        self.dead = True
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if not self.dead:
            self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds every request sleeps")
    ap.add_argument("--script", default=None, help="JSON file with the script (see the module docstring)")
    ap.add_argument("--content", default="The answer is 42.\n#### 42", help="default reply")
    a = ap.parse_args()
    script = json.load(open(a.script)) if a.script else {}
    script.setdefault("delay", a.delay)
    script.setdefault("default", {"content": a.content, "reasoning_content": "I think it is 42."})
    srv = FaultServer(script, port=a.port)
    print(f"fault server on {srv.base_url}", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
