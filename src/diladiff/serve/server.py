"""The HTTP side of `diladiff serve`: the standard library's ThreadingHTTPServer, one static page
(page.html, no network needed) and a JSON API:

    GET  /               the page
    GET  /api/runs       {"runs": [run_info, ...], "strategies": [...]}: each loaded run's
                         kind, L and defaults; the decoding strategies
    POST /api/generate   a JSON request (stream.parse_job) -> 200 and one JSON event per line
                         (application/x-ndjson, streamed as the steps happen), or a 4xx
                         {"error": message}: a bad value, an unknown run, a body too large

Every run is loaded once, at start (api.load: run folders, exported folders, hub ids); each has
a lock, so its generations run one at a time while other runs' can run beside them. A bad
request is answered and forgotten; an error inside a generation becomes an "error" event; the
server keeps serving either way. It binds to 127.0.0.1 unless told otherwise: it has no
authentication.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from diladiff.errors import DiladiffError
from diladiff.sampling.masked import STRATEGIES
from diladiff.serve.stream import BadRequest, StepStream, parse_job, run_info

MAX_BODY_BYTES = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run_names(runs: list[str]) -> list[str]:
    """The name each run is shown and requested by: its folder's name (a hub id as given),
    made unique with #2, #3, ... when two runs share one."""
    names: list[str] = []
    for run in runs:
        path = Path(run)
        base = path.name if path.exists() else str(run)
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}#{n}"
        names.append(name)
    return names


class Playground:
    """The loaded runs (name -> api.Model), their locks and the page."""

    def __init__(self, models: dict, log_requests: bool = False):
        if not models:
            raise DiladiffError("serve needs at least one run")
        self.models = dict(models)
        self.locks = {name: threading.Lock() for name in self.models}
        self.info = [run_info(name, model) for name, model in self.models.items()]
        self.page = resources.files(__package__).joinpath("page.html").read_bytes()
        self.log_requests = log_requests

    @classmethod
    def load(cls, runs: list[str], device: str = "auto", weights: str = "ema", **kwargs):
        """Load every run (run folder, exported folder or hub id) once."""
        from diladiff.api import load

        models = {}
        for name, run in zip(run_names(runs), runs, strict=True):
            models[name] = load(run, device=device, weights=weights)
        return cls(models, **kwargs)

    def make_server(self, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
        """A server bound to host:port (port 0: a free one) answering with this playground."""
        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise DiladiffError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        server.daemon_threads = True
        server.playground = self
        return server


class Handler(BaseHTTPRequestHandler):
    """One request; `self.server.playground` holds the runs."""

    server_version = "diladiff-serve"
    protocol_version = "HTTP/1.0"  # one response per connection: a stream ends when it closes

    @property
    def playground(self) -> Playground:
        return self.server.playground

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        if self.playground.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, self.playground.page, "text/html; charset=utf-8")
        elif path == "/api/runs":
            self._json(200, {"runs": self.playground.info, "strategies": sorted(STRATEGIES)})
        else:
            self._json(404, {"error": f"no page {path}"})

    def _body(self):
        """The request's JSON body (BadRequest: none, too large, not JSON)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("the request needs a Content-Length", 411)
        if int(length) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes", 413)
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"the request body is not JSON ({exc})") from None

    def do_POST(self):  # noqa: N802
        path = urlsplit(self.path).path
        if path != "/api/generate":
            self._json(404, {"error": f"no endpoint {path}"})
            return
        pg = self.playground
        try:
            body = self._body()
            if not isinstance(body, dict):
                raise BadRequest("the request must be a JSON object")
            name = body.get("run")
            if not isinstance(name, str) or name not in pg.models:
                raise BadRequest(f"unknown run {name!r}; this server has {list(pg.models)}", 404)
            job = parse_job(pg.models[name], body)
        except BadRequest as exc:
            self._json(exc.status, {"error": exc.message})
            return
        except Exception as exc:  # a bug: answered, logged, and the server goes on
            traceback.print_exc()
            self._json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            return
        stream = StepStream(name, pg.models[name], job, pg.locks[name])
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        try:
            for event in stream:
                self.wfile.write(json.dumps(event).encode() + b"\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            stream.cancel()  # the page went away: stop at the next step


def serve(
    runs: list[str],
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "auto",
    weights: str = "ema",
) -> int:
    """Load `runs`, serve the playground on host:port until interrupted (Ctrl-C); 0."""
    playground = Playground.load(runs, device, weights, log_requests=True)
    server = playground.make_server(host, port)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    if host not in LOOPBACK:
        print(
            f"warning: listening on {host}: anyone who can reach it can run the models "
            "(no authentication)",
            file=sys.stderr,
        )
    kinds = ", ".join(f"{i['name']} ({i['kind']})" for i in playground.info)
    print(f"serving {kinds} at http://{shown}:{bound_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
