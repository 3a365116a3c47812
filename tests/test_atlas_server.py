"""The atlas server: a real server on a site folder, requested with raw sockets so no client
normalises the path; files inside are served, every way out is refused, loopback by default."""

from __future__ import annotations

import os
import socket

import pytest

from sae4scfm.atlas.server import serve
from sae4scfm.errors import InputError

SECRET = b"secret outside the site"


@pytest.fixture()
def site(tmp_path):
    """tmp/site/{index.html, data/a b.js, sub/index.html, out -> ../outside, link.txt and linked/index.html ->
    ../outside/secret.txt} and tmp/outside/secret.txt."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    (tmp_path / "site-secret.txt").write_bytes(SECRET)  # a sibling whose name starts like the site's
    root = tmp_path / "site"
    (root / "data").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "index.html").write_bytes(b"<html>atlas index</html>")
    (root / "data" / "a b.js").write_bytes(b'window.atlasData("k", 1)')
    (root / "sub" / "index.html").write_bytes(b"sub index")
    (root / "empty").mkdir()
    os.symlink(outside, root / "out")
    os.symlink(outside / "secret.txt", root / "link.txt")
    (root / "linked").mkdir()
    os.symlink(outside / "secret.txt", root / "linked" / "index.html")  # a folder whose index.html points out
    server, url = serve(root)
    yield server, root
    server.shutdown()
    server.server_close()


def raw_get(server, target: str, method: str = "GET") -> tuple[int, bytes]:
    """Send ``method target HTTP/1.1`` byte for byte; return (status, body)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_binds_loopback_by_default(site):
    server, _ = site
    assert server.server_address[0] == "127.0.0.1"
    assert server.server_address[1] > 0


@pytest.mark.parametrize("target, body", [
    ("/", b"<html>atlas index</html>"),
    ("/index.html", b"<html>atlas index</html>"),
    ("/index.html?x=1#top", b"<html>atlas index</html>"),
    ("/data/a%20b.js", b'window.atlasData("k", 1)'),
    ("/sub/", b"sub index"),
    ("http://x/index.html", b"<html>atlas index</html>"),  # absolute-form request target
])
def test_serves_files_inside(site, target, body):
    status, got = raw_get(site[0], target)
    assert (status, got) == (200, body)


def test_head_has_no_body(site):
    status, got = raw_get(site[0], "/index.html", method="HEAD")
    assert (status, got) == (200, b"")


@pytest.mark.parametrize("target", [
    "/../outside/secret.txt",
    "/../../../../../../etc/passwd",
    "/data/../../outside/secret.txt",
    "/%2e%2e/outside/secret.txt",
    "/%2E%2E/outside/secret.txt",
    "/.%2e/outside/secret.txt",
    "/..%2foutside%2fsecret.txt",
    "/%2e%2e%2foutside%2fsecret.txt",
    "/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/..%5coutside%5csecret.txt",
    "/..\\outside\\secret.txt",
    "/%2fetc%2fpasswd/../../x",
    "/../site-secret.txt",
    "/out/secret.txt",  # a symlinked folder pointing out
    "/link.txt",  # a symlinked file pointing out
    "/linked/",  # a folder whose index.html is a symlink pointing out
    "/linked",
    "/index.html%00.js",
    "/%ff%fe",  # not UTF-8
    "http://x/../outside/secret.txt",
])
def test_refuses_escapes(site, target):
    status, got = raw_get(site[0], target)
    assert status == 403, (target, status)
    assert SECRET not in got


@pytest.mark.parametrize("target", [
    "/etc/passwd",  # absolute paths are taken inside the site
    "//etc/passwd",
    "/%2fetc%2fpasswd",
    "/missing.js",
    "/empty/",  # a folder without index.html: no listing
])
def test_absolute_and_missing_are_not_found(site, target):
    status, got = raw_get(site[0], target)
    assert status == 404, (target, status)
    assert b"root:" not in got and SECRET not in got


def test_refuses_a_folder_that_is_not_a_site(tmp_path):
    with pytest.raises(InputError, match="index.html"):
        serve(tmp_path)


def test_serve_forever_waits_for_the_running_loop(site):
    """build_atlas calls server.serve_forever() after serve(): it must block until shutdown, not start a second
    loop, and return once another thread shuts the server down."""
    import threading
    import time

    server, _ = site
    waiter = threading.Thread(target=server.serve_forever)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and raw_get(server, "/index.html")[0] == 200
    server.shutdown()
    waiter.join(5)
    assert not waiter.is_alive() and not server.thread.is_alive()
