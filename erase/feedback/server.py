"""The labelling page's server: a small HTTP server on the loopback interface, no dependencies.

    GET  /                          the page (page.html, one static file)
    GET  /images/<name>             an image of the manifest (nothing else under the folder is reachable)
    GET  /api/state?labeller=NAME   mode, concept, the items (images or rank groups, with prompts), what NAME did
    POST /api/answer                a binary or rank record without id/time -> appended to labels.jsonl
    POST /api/undo                  {"labeller"} -> undoes that labeller's latest standing answer

Every answer is on disk (fsynced) before the page is told it is saved. The page has no authentication, so the
server only listens on a loopback address and only answers requests addressed to it by that name (a web page
elsewhere cannot reach it through DNS rebinding, nor POST to it without the JSON content type).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from erase.errors import EraseError, UsageError
from erase.feedback import labels
from erase.feedback.collect import IMAGES, read_collection

PAGE = Path(__file__).with_name("page.html")
MAX_BODY = 64 * 1024
LOCAL_NAMES = ("localhost",)


def loopback_host(host: str) -> str:
    """`host` if it is a loopback address (or "localhost", taken as 127.0.0.1); a usage error otherwise."""
    if host in LOCAL_NAMES:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise UsageError(f"--host {host} is not a loopback address: the labelling page has no authentication, so it only listens on this machine "
                         "(127.0.0.1 or ::1; reach it from elsewhere through an SSH tunnel: ssh -L PORT:127.0.0.1:PORT host)")
    return str(address)


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, folder: Path, mode: str, host: str, port: int) -> None:
        if mode not in labels.MODES:
            raise UsageError(f"--mode must be one of {', '.join(labels.MODES)}, not {mode!r}")
        self.folder = Path(folder)
        self.info, self.rows = read_collection(self.folder)
        if not self.rows:
            raise UsageError(f"{folder} holds no images to label")
        self.mode = mode
        self.images = {r["image"]: r for r in self.rows}
        self.groups = labels.groups(self.rows) if mode == "rank" else []
        if mode == "rank" and not self.groups:
            raise UsageError("rank mode needs at least 2 images")
        host = loopback_host(host)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{self.server_address[1]}/"

    def items(self) -> list[dict]:
        def image(name: str) -> dict:
            row = self.images[name]
            return {"image": name, "prompt": row.get("prompt", ""), "seed": row.get("seed")}

        if self.mode == "binary":
            return [image(r["image"]) for r in self.rows]
        return [{"group": [image(n) for n in g]} for g in self.groups]

    def progress(self, labeller: str | None) -> dict:
        if labeller is None:
            return {"done": [], "next": 0, "total": len(self.groups) if self.mode == "rank" else len(self.rows)}
        p = labels.progress(self.folder, self.rows, labeller, self.mode)
        index = {r["image"]: i for i, r in enumerate(self.rows)}
        done = sorted(index[n] for n in p["done"]) if self.mode == "binary" else sorted(p["done"])
        return {"done": done, "next": p["next"], "total": p["total"]}

    def item_of(self, record: dict) -> int | None:
        """The index of the page item a record answers."""
        if record["kind"] == "binary":
            return next((i for i, r in enumerate(self.rows) if r["image"] == record["image"]), None)
        return next((i for i, g in enumerate(self.groups) if set(g) == set(record["group"])), None)

    def check_answer(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise UsageError("the answer must be a JSON object")
        if "id" in body or "time" in body or "score" in body:
            raise UsageError("the page sends answers without id, time or score")
        labels.check_labeller(body.get("labeller"), auto=False)
        if body.get("kind") != self.mode:
            raise UsageError(f"this page labels in {self.mode} mode; kind must be {self.mode!r}")
        labels.validate(body, set(self.images))
        if self.mode == "rank" and self.item_of(body) is None:
            raise UsageError("group is not one of this collection's rank groups")
        return body


class Handler(BaseHTTPRequestHandler):
    server: LabelServer
    server_version = "erase-label"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per image request would bury the URL; errors reach the page instead

    # ---- plumbing

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        """Only requests addressed to this server by a loopback name (no DNS rebinding)."""
        host = (self.headers.get("Host") or "").strip().lower()
        port = str(self.server.server_address[1])
        name = host[:-len(port) - 1] if host.endswith(":" + port) else host
        if name in LOCAL_NAMES:
            return True
        try:
            return ipaddress.ip_address(name.strip("[]")).is_loopback
        except ValueError:
            return False

    def _body(self):
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise UsageError("send JSON (Content-Type: application/json)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise UsageError("bad Content-Length") from None
        if not 0 < length <= MAX_BODY:
            raise UsageError(f"the body must be 1 to {MAX_BODY} bytes")
        try:
            return json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            raise UsageError("the body is not valid JSON") from None

    def _guarded(self, fn) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "requests must be addressed to 127.0.0.1 or localhost")
        try:
            fn()
        except UsageError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
        except EraseError as e:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug: the page shows the message, the server keeps serving
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

    # ---- routes

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_HEAD(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path in ("/", "/index.html"):
            csp = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                   "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
            return self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8", {"Content-Security-Policy": csp})
        if path.startswith("/images/"):
            name = unquote(path[len("/images/"):])
            if name not in self.server.images:  # manifest names only: no "..", no other files
                return self._error(HTTPStatus.NOT_FOUND, "no such image in this collection")
            file = self.server.folder / IMAGES / name
            if not file.is_file():
                return self._error(HTTPStatus.NOT_FOUND, f"{name} is in the manifest but missing from {IMAGES}/")
            kind = "image/png" if name.lower().endswith(".png") else "image/jpeg" if name.lower().endswith((".jpg", ".jpeg")) else "application/octet-stream"
            return self._send(HTTPStatus.OK, file.read_bytes(), kind)
        if path == "/api/state":
            labeller = parse_qs(url.query).get("labeller", [None])[0]
            if labeller is not None:
                labels.check_labeller(labeller, auto=False)
            s = self.server
            return self._json(HTTPStatus.OK, {"mode": s.mode, "concept": s.info.get("concept", ""), "labeller": labeller,
                                              "items": s.items(), "answers": len(labels.answers(s.folder)), **s.progress(labeller)})
        self._error(HTTPStatus.NOT_FOUND, "not found")

    def _post(self) -> None:
        s = self.server
        path = urlsplit(self.path).path
        if path == "/api/answer":
            body = s.check_answer(self._body())
            record = labels.append(s.folder, body, images=set(s.images))
            return self._json(HTTPStatus.OK, {"record": record, "item": s.item_of(record), **s.progress(record["labeller"])})
        if path == "/api/undo":
            body = self._body()
            labeller = labels.check_labeller(body.get("labeller") if isinstance(body, dict) else None, auto=False)
            done = labels.undo_latest(s.folder, labeller)
            if done is None:
                raise UsageError(f"{labeller} has nothing left to undo")
            undo, record = done
            return self._json(HTTPStatus.OK, {"undo": undo, "record": record, "item": s.item_of(record), **s.progress(labeller)})
        self._error(HTTPStatus.NOT_FOUND, "not found")


def graphical_browser() -> bool:
    """Whether a browser can open here: not on a Linux box without a display (a text browser would take the
    terminal over), unless $BROWSER says which one to use."""
    if os.environ.get("BROWSER"):
        return True
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


def make_server(folder: Path, mode: str = "binary", host: str = "127.0.0.1", port: int = 0) -> tuple[LabelServer, str]:
    """The server, bound and ready (not yet serving), and its URL. Tests run `serve_forever` in a thread."""
    try:
        server = LabelServer(Path(folder), mode, host, port)
    except OSError as e:
        raise EraseError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return server, server.url


def serve(folder: Path, mode: str = "binary", host: str = "127.0.0.1", port: int = 0, open_browser: bool = True,
          announce=print) -> int:
    """Serve the page until Ctrl-C; `announce(url)` once listening. Returns how many answers labels.jsonl holds."""
    server, url = make_server(folder, mode, host, port)
    announce(url)
    if open_browser and graphical_browser():
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return len(labels.answers(server.folder))
