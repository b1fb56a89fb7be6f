"""The real `retrieve serve` in its own process, on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.cli import main
from tests.test_serve import build_index

# Until cli/main.py registers `serve`, the command is registered by this shim first.
LAUNCH = (
    "import sys; from retrieval.cli.main import cli\n"
    "if 'serve' not in cli.commands:\n"
    "    from retrieval.cli.serve_cmds import register; register(cli)\n"
    "sys.exit(cli(sys.argv[1:]))"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(index_dir: Path, *args: str, timeout: float = 60) -> Iterator[str]:
    """Run `retrieve serve` until the block ends; yields its base URL once it answers."""
    port = free_port()
    command = ["serve", "--index", str(index_dir), "--port", str(port), *args]
    installed = Path(sys.executable).with_name("retrieve")
    if installed.exists() and "serve_cmds" in inspect.getsource(main._register):
        argv = [str(installed), *command]
    else:
        argv = [sys.executable, "-c", LAUNCH, *command]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve exited: {process.stderr.read()}")
            try:
                urllib.request.urlopen(base + "/", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise AssertionError("serve did not answer in time") from None
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


def multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "retrieve-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def call(url: str, data: bytes | None = None, content_type: str | None = None):
    request = urllib.request.Request(url, data=data)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, small_model: Path) -> tuple[Path, Path]:
    return build_index(tmp_path_factory.mktemp("serve-process"), small_model)


def test_retrieve_serve_answers_queries_and_survives_bad_ones(built) -> None:
    photos, index_dir = built
    photo = sorted(photos.rglob("*.png"))[0]
    with serving(index_dir) as base:
        status, info = call(base + "/api/info")
        assert status == 200 and info["count"] == 12
        status, answer = call(
            base + "/api/query?k=3", *multipart("file", "q.png", photo.read_bytes())
        )
        assert status == 200 and len(answer["neighbors"]) == 3
        assert answer["neighbors"][0]["path"] == str(photo)  # an indexed image finds itself
        status, bad = call(base + "/api/query", *multipart("file", "q.png", b"not an image"))
        assert status == 400 and bad["error"].startswith("not an image")
        status, _ = call(base + "/image/..%2F..%2Fetc%2Fpasswd")
        assert status == 404
        status, again = call(base + f"/api/neighbors/{answer['neighbors'][1]['id']}?k=2")
        assert status == 200 and len(again["neighbors"]) == 2
