"""A static file server for a built atlas that never serves a file outside the site folder.

``serve(site_dir)`` starts a threaded ``http.server`` on 127.0.0.1 (a free port by default) in a
background thread and returns ``(server, url)``; ``server.shutdown()`` stops it. Every request path is
percent-decoded once and resolved (symlinks followed) against the site folder; the server answers
403 when the decoded path has a ``..`` segment, a backslash or a NUL byte, or resolves outside the
folder (``..``, ``%2e%2e``, ``%2f``-encoded separators, absolute paths, symlinks pointing out), and 404
for a missing file or a folder without ``index.html`` (no directory listings).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sae4scfm.errors import InputError


class _Refused(Exception):
    """The request path is outside the site folder."""


class SiteHandler(SimpleHTTPRequestHandler):
    """GET/HEAD of files under ``self.directory`` only (see the module docstring)."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def site_file(self) -> Path:
        """The resolved file the request names, inside the site folder; raises _Refused."""
        root = Path(self.directory).resolve()
        raw = urlsplit(self.path).path  # drops ?query and #fragment; an absolute-form URI keeps its path
        decoded = unquote(raw, errors="strict")
        if "\\" in decoded or "\x00" in decoded or ".." in decoded.split("/"):
            raise _Refused(raw)
        target = (root / decoded.lstrip("/")).resolve()
        if target.is_dir():  # a folder serves its index.html, which may itself be a link out of the site
            target = (target / "index.html").resolve()
        if target != root and root not in target.parents:
            raise _Refused(raw)
        return target

    def send_head(self):
        try:
            target = self.site_file()
        except (_Refused, UnicodeDecodeError):
            self.send_error(HTTPStatus.FORBIDDEN, "path outside the site")
            return None
        if not target.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "file not found")
            return None
        try:
            f = open(target, "rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "file not found")
            return None
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-type", self.guess_type(str(target)))
        self.send_header("Content-Length", str(target.stat().st_size))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        return f


class AtlasServer(ThreadingHTTPServer):
    """The threaded server ``serve`` returns; its loop already runs in ``self.thread``."""

    daemon_threads = True
    thread: threading.Thread | None = None

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Block until the server stops (``shutdown()``; Ctrl-C interrupts the wait): waits for the loop in
        ``self.thread`` rather than starting a second one."""
        if self.thread is not None and self.thread.is_alive() and self.thread is not threading.current_thread():
            while self.thread.is_alive():
                self.thread.join(poll_interval)
            return
        super().serve_forever(poll_interval)


def serve(site_dir: Path, host: str = "127.0.0.1", port: int = 0):
    """Serve ``site_dir`` on ``host:port`` (port 0 = a free one) from a daemon thread.

    Returns ``(server, url)``: the :class:`AtlasServer` (``server.thread`` runs its loop;
    ``server.serve_forever()`` blocks until it stops; ``server.shutdown()`` then ``server.server_close()``
    stop it) and ``http://host:port/``. A host that
    is not a loopback address is allowed but warned about on stderr: the site is then reachable from
    the network.
    """
    site_dir = Path(site_dir)
    if not (site_dir / "index.html").is_file():
        raise InputError(f"{site_dir} is not a built atlas (no index.html); build it with "
                         "scripts/build_atlas.py first, or pass atlas.out=<the site folder>")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"warning: serving the atlas on {host}, which is not a loopback address: "
              "anyone who can reach this machine can read it", file=sys.stderr)
    root = str(site_dir.resolve())

    class Handler(SiteHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=root, **kwargs)

    server_class = AtlasServer
    if ":" in host:  # an IPv6 address such as ::1
        server_class = type("AtlasServer6", (AtlasServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, int(port)), Handler)
    server.thread = threading.Thread(target=ThreadingHTTPServer.serve_forever, args=(server,), name="atlas-server",
                                     daemon=True)
    server.thread.start()
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return server, f"http://{shown}:{bound_port}/"
