"""`retrieve serve` through Starlette's TestClient: every endpoint and every bad input."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from retrieval import Index, IndexOptions
from retrieval.cli.main import cli
from retrieval.cli.serve_cmds import is_loopback, register
from retrieval.serve import ServeOptions, create_app
from retrieval.serve.batcher import Upload, answer_uploads
from tests.corpus import make_image, make_labelled_folder, png_bytes

starlette_testclient = pytest.importorskip("starlette.testclient")
TestClient = starlette_testclient.TestClient

if "serve" not in cli.commands:  # until cli/main.py registers it
    register(cli)


def build_index(root: Path, small_model: Path) -> tuple[Path, Path]:
    """12 labelled 48-px images (3 classes) indexed with the small model: (photos, index)."""
    photos, index_dir = root / "photos", root / "index"
    make_labelled_folder(photos, classes=3, per_class=4, size=48)
    Index.create(index_dir, photos, IndexOptions(weights=str(small_model))).close()
    return photos, index_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, small_model: Path) -> tuple[Path, Path]:
    return build_index(tmp_path_factory.mktemp("serve"), small_model)


@pytest.fixture(scope="module")
def index(built):
    with Index.open(built[1]) as ix:
        yield ix


def client_for(index: Index, **options) -> TestClient:
    options.setdefault("warm_model", False)
    return TestClient(create_app(index, ServeOptions(**options)))


@pytest.fixture(scope="module")
def client(index):
    with client_for(index) as c:
        yield c


def jpeg_bytes(size: int = 48, seed: int = 3) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", (size, size), (200, 40 + seed * 10, 40))
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def upload(client: TestClient, data: bytes, name: str = "q.jpg", **params):
    return client.post("/api/query", files={"file": (name, data, "image/jpeg")}, params=params)


def first_photo(built) -> Path:
    return sorted(built[0].rglob("*.png"))[0]


def assert_still_answering(client: TestClient) -> None:
    assert client.get("/api/info").status_code == 200


# -- the page and the info -----------------------------------------------------------------------


def test_page_and_its_static_files_are_served_from_the_package(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert (
        '<script src="/static/app.js"' in page.text and "http" not in page.text.split("<body>")[1]
    )
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/serve.py").status_code == 404


def test_info_is_what_retrieve_info_json_gives(client, index) -> None:
    info = client.get("/api/info").json()
    assert info == json.loads(json.dumps(index.info()))
    assert info["count"] == 12
    assert client.get("/api/labels").json() == {"circles": 4, "squares": 4, "stripes": 4}


# -- queries -------------------------------------------------------------------------------------


def test_query_answers_as_retrieve_query_json_for_the_same_image(client, built) -> None:
    photo = first_photo(built)
    printed = CliRunner().invoke(
        cli, ["query", str(photo), "-k", "4", "--json", "--index", str(built[1])]
    )
    assert printed.exit_code == 0, printed.output
    expected = json.loads(printed.stdout.splitlines()[0])
    answer = upload(client, photo.read_bytes(), name=photo.name, k=4)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["query"] == photo.name and got["took_ms"] > 0
    strip = [{key: n[key] for key in ("rank", "id", "path", "label")} for n in got["neighbors"]]
    assert strip == [
        {key: n[key] for key in ("rank", "id", "path", "label")} for n in expected["neighbors"]
    ]
    for mine, theirs in zip(got["neighbors"], expected["neighbors"]):
        assert mine["distance"] == pytest.approx(theirs["distance"], rel=1e-4, abs=1e-3)
        assert mine["thumb_url"] == f"/thumb/{mine['id']}"
        assert mine["image_url"] == f"/image/{mine['id']}"
    assert set(got) - set(expected) == {"took_ms", "classes"}


def test_query_gives_the_models_top_classes_for_a_checkpoint_with_classes(client) -> None:
    classes = upload(client, jpeg_bytes()).json()["classes"]
    assert [c["label"] for c in classes] and {c["label"] for c in classes} <= {"a", "b", "c"}
    probabilities = [c["probability"] for c in classes]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)  # all 3 of the 3 classes


def test_k_is_taken_from_the_form_or_the_query_string(client) -> None:
    assert len(upload(client, jpeg_bytes(), k=2).json()["neighbors"]) == 2
    form = client.post("/api/query", files={"file": ("q.jpg", jpeg_bytes())}, data={"k": "3"})
    assert len(form.json()["neighbors"]) == 3
    assert len(upload(client, jpeg_bytes()).json()["neighbors"]) == 6


@pytest.mark.parametrize("k", ["0", "-1", "1001", "x", "2.5"])
def test_k_outside_one_to_a_thousand_gets_422(client, k) -> None:
    answer = upload(client, jpeg_bytes(), k=k)
    assert answer.status_code == 422 and "k" in answer.json()["error"]
    assert client.get("/api/neighbors/1", params={"k": k}).status_code == 422


def test_k_beyond_the_index_is_answered_with_all_it_holds(client) -> None:
    """k is a most: the page's default 6 must work on a collection of 3."""
    assert len(upload(client, jpeg_bytes(), k=13).json()["neighbors"]) == 12
    others = client.get("/api/neighbors/1", params={"k": 12}).json()["neighbors"]
    assert len(others) == 11 and 1 not in {n["id"] for n in others}


def _truncated_jpeg() -> bytes:
    data = jpeg_bytes(64)
    return data[: len(data) * 6 // 10]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, this is text and not a picture\n" * 20, "not an image"),
        (b"<html><body>hi</body></html>", "not an image"),
        (_truncated_jpeg(), "truncated"),
        (png_bytes(30000, 30000), "too large"),  # a decompression bomb: only its header is read
    ],
    ids=["empty", "text", "html", "truncated", "bomb"],
)
def test_bad_uploads_get_400_with_the_index_skip_reason(client, data, reason) -> None:
    answer = upload(client, data)
    assert answer.status_code == 400
    assert answer.json()["error"].startswith(reason)
    assert_still_answering(client)


def test_upload_without_the_file_field_or_as_another_type_is_refused(client) -> None:
    missing = client.post("/api/query", data={"k": "2"}, files={"other": ("x", b"1")})
    assert missing.status_code == 400 and "'file'" in missing.json()["error"]
    assert client.post("/api/query", data={"file": "text"}).status_code in (400, 415)
    assert (
        client.post(
            "/api/query", content=b"raw", headers={"content-type": "image/jpeg"}
        ).status_code
        == 415
    )
    broken = client.post(
        "/api/query",
        content=b"--x\r\nnonsense",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert broken.status_code == 400
    assert client.get("/api/query").status_code == 405
    assert_still_answering(client)


def test_uploads_over_the_limit_get_413(index) -> None:
    with client_for(index, max_upload=10_000) as small:
        answer = upload(small, b"\xff" * 20_000)
        assert answer.status_code == 413 and "limit" in answer.json()["error"]
        chunked = small.post(
            "/api/query",
            content=(b"\xff" * 4096 for _ in range(5)),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert chunked.status_code == 413
        assert upload(small, jpeg_bytes()).status_code == 200


def test_an_oversized_upload_is_refused_before_its_body_is_read(index) -> None:
    app = create_app(index, ServeOptions(max_upload=1000, warm_model=False))
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/query",
        "query_string": b"",
        "headers": [(b"content-length", b"5000000"), (b"content-type", b"image/jpeg")],
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413


def test_answer_uploads_batches_several_queries_each_with_its_own_k(index, built) -> None:
    photo = first_photo(built).read_bytes()
    answers = answer_uploads(index, [Upload(photo, 1), Upload(b"", 3), Upload(photo, 5)])
    assert [len(a.result.neighbors) for a in answers] == [1, 0, 5]
    assert answers[1].result.error == "empty file"
    assert answers[0].result.neighbors[0] == answers[2].result.neighbors[0]


# -- rows, images, thumbnails --------------------------------------------------------------------


def test_neighbors_by_id_come_from_stored_vectors(client, index) -> None:
    answer = client.get("/api/neighbors/3", params={"k": 4}).json()
    [expected] = index.neighbors([3], k=4)
    assert answer["id"] == 3 and answer["query"] == expected.query
    assert [n["id"] for n in answer["neighbors"]] == [n.id for n in expected.neighbors]
    assert 3 not in [n["id"] for n in answer["neighbors"]]
    assert answer["neighbors"][0]["thumb_url"] == f"/thumb/{answer['neighbors'][0]['id']}"
    assert len(answer["classes"]) == 3


@pytest.mark.parametrize(
    "path",
    [
        "/image/../../etc/passwd",
        "/image/..%2F..%2Fetc%2Fpasswd",
        "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/image/1%2F..%2F..%2Fetc%2Fpasswd",
        "/image/-1",
        "/image/99999",
        "/image/1.0",
        "/image/99999999999999999999999",
        "/image/%00",
        "/thumb/..%2Findex.html",
        "/thumb/-5",
        "/api/neighbors/-1",
        "/api/neighbors/99999",
        "/api/neighbors/..%2F1",
        "/static/..%2F__init__.py",
        "/static/%2e%2e/app.py",
    ],
)
def test_traversal_attempts_and_unknown_ids_get_404(client, path) -> None:
    answer = client.get(path)
    assert answer.status_code == 404 and "error" in answer.json()
    assert_still_answering(client)


def test_image_is_the_indexed_file_itself(client, index) -> None:
    row = index.rows(limit=1)[0]
    answer = client.get(f"/image/{row.id}")
    assert answer.status_code == 200 and answer.content == Path(row.path).read_bytes()
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_thumbnail_is_a_jpeg_cached_beside_the_index_with_an_etag(client, index) -> None:
    row = index.rows(limit=1)[0]
    first = client.get(f"/thumb/{row.id}", params={"size": 100})
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert "max-age" in first.headers["cache-control"]
    image = Image.open(io.BytesIO(first.content))
    assert image.format == "JPEG" and max(image.size) == 48  # never enlarged
    cached = list((index.directory / "thumbs").rglob(f"{row.sha256}-128.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.content
    etag = {"if-none-match": first.headers["etag"]}
    assert client.get(f"/thumb/{row.id}", params={"size": 128}, headers=etag).status_code == 304
    assert client.get(f"/thumb/{row.id}", params={"size": 256}, headers=etag).status_code == 200
    assert client.get(f"/thumb/{row.id}", params={"size": "big"}).status_code == 422


def test_images_pages_through_rows_filtered_by_label_and_path(client) -> None:
    page = client.get("/api/images", params={"limit": 5}).json()
    assert page["total"] == 12 and len(page["images"]) == 5
    rest = client.get("/api/images", params={"offset": 5, "limit": 100}).json()["images"]
    ids = [r["id"] for r in page["images"] + rest]
    assert len(ids) == 12 == len(set(ids))
    labelled = client.get("/api/images", params={"label": "squares"}).json()
    assert labelled["total"] == 4 and {r["label"] for r in labelled["images"]} == {"squares"}
    named = client.get("/api/images", params={"q": "stripes/"}).json()
    assert named["total"] == 4 and all("stripes/" in r["path"] for r in named["images"])
    assert client.get("/api/images", params={"limit": 0}).status_code == 422
    assert client.get("/api/images", params={"offset": -1}).status_code == 422
    assert client.get("/api/images", params={"offset": 10**20}).status_code == 422  # > int64


# -- the token, URLs ------------------------------------------------------------------------------


def test_with_a_token_every_api_call_needs_it(index) -> None:
    with client_for(index, token="s3cret") as c:
        assert c.get("/").status_code == 200  # the page itself holds no data
        for path in ("/api/info", "/api/images", "/api/neighbors/1", "/thumb/1", "/image/1"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"authorization": "Bearer wrong"}).status_code == 401
        good = {"authorization": "Bearer s3cret"}
        assert c.get("/api/info", headers=good).status_code == 200
        assert upload(c, jpeg_bytes()).status_code == 401
        assert (
            c.post("/api/query", headers=good, files={"file": ("q", jpeg_bytes())}).status_code
            == 200
        )
        c.cookies.set("retrieve_token", "s3cret")
        assert c.get("/thumb/1").status_code == 200  # <img> tags send the page's cookie
        assert c.get("/api/info").status_code == 401  # the API takes only the header


class _Images(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        data = self.body if self.path == "/ok.jpg" else b"\xff" * 50_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_http():
    _Images.body = jpeg_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_queries_are_refused_unless_allowed(client, local_http) -> None:
    answer = client.post("/api/query", json={"url": local_http + "/ok.jpg"})
    assert answer.status_code == 403 and "--allow-url" in answer.json()["error"]


def test_allowed_url_queries_are_fetched_with_a_size_cap(index, local_http) -> None:
    with client_for(index, allow_url=True, max_upload=20_000) as c:
        ok = c.post("/api/query", json={"url": local_http + "/ok.jpg", "k": 2})
        assert ok.status_code == 200 and len(ok.json()["neighbors"]) == 2
        big = c.post("/api/query", json={"url": local_http + "/big.jpg"})
        assert big.status_code == 413
        assert c.post("/api/query", json={"url": "file:///etc/passwd"}).status_code == 400
        assert c.post("/api/query", json={"url": "http://[::1"}).status_code == 400
        assert c.post("/api/query", json={"nothing": 1}).status_code == 400
        assert (
            c.post(
                "/api/query", content=b"{bad", headers={"content-type": "application/json"}
            ).status_code
            == 400
        )


# -- live updates, the command --------------------------------------------------------------------


def test_the_server_answers_from_a_new_generation_within_seconds(tmp_path, small_model) -> None:
    photos, index_dir = build_index(tmp_path, small_model)
    with Index.open(index_dir) as served, client_for(served, reload_every=0.1) as c:
        assert c.get("/api/info").json()["count"] == 12
        for i in range(3):
            make_image(photos / "class9" / f"new{i}.png", size=(48, 48), seed=50 + i)
        with Index.open(index_dir) as writer:
            writer.update(photos, IndexOptions(weights=str(small_model)))
        deadline = time.monotonic() + 10
        while c.get("/api/info").json()["count"] != 15 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/api/info").json()["count"] == 15
        assert c.get("/api/images", params={"label": "class9"}).json()["total"] == 3
        assert len(upload(c, jpeg_bytes(), k=15).json()["neighbors"]) == 15


def test_binding_beyond_loopback_without_a_token_warns(built, monkeypatch) -> None:
    import uvicorn

    ran = []  # where each server would have listened (it is not started)
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets: ran.append(sockets[0].getsockname()[0])
    )
    serve = ["serve", "--index", str(built[1]), "--port", "0"]
    loud = CliRunner().invoke(cli, [*serve, "--host", "0.0.0.0"])
    assert loud.exit_code == 0 and "warning" in loud.stderr and ran[0] == "0.0.0.0"
    quiet = CliRunner().invoke(cli, [*serve, "--token", "t", "--host", "0.0.0.0"])
    assert "warning" not in quiet.stderr
    local = CliRunner().invoke(cli, serve)
    assert "warning" not in local.stderr and ran[-1] == "127.0.0.1"
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.1.2.3")
    bad = CliRunner().invoke(cli, ["serve", "--index", str(built[1]), "--max-upload", "lots"])
    assert bad.exit_code == 2


def test_a_slow_query_does_not_block_other_requests(index, monkeypatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real_embed = index.embed

    def slow_embed(queries):
        entered.set()
        assert release.wait(60), "the other request never got through"
        return real_embed(queries)

    monkeypatch.setattr(index, "embed", slow_embed)
    with client_for(index) as c:
        answers = []
        query = threading.Thread(target=lambda: answers.append(upload(c, jpeg_bytes())))
        query.start()
        assert entered.wait(60)
        # The model thread is busy inside embed: the event loop still answers.
        assert c.get("/api/info").status_code == 200
        assert c.get("/api/neighbors/1", params={"k": 2}).status_code == 200
        assert not answers
        release.set()
        query.join(60)
        assert answers[0].status_code == 200


def test_an_index_of_no_images_answers_a_query_with_why(tmp_path, small_model, caplog) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("not a picture")
    Index.create(tmp_path / "idx", tmp_path / "bad", IndexOptions(weights=str(small_model))).close()
    with Index.open(tmp_path / "idx") as empty, client_for(empty) as c:
        answer = upload(c, jpeg_bytes())
        assert answer.status_code == 400 and "holds no images" in answer.json()["error"]
        assert c.get("/api/clusters").status_code == 422
    assert "Traceback" not in caplog.text and "failed" not in caplog.text


def test_a_port_in_use_is_one_line_before_any_serving_line(built) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--index", str(built[1]), "--port", str(port)]
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (
        f"Error: port {port} on 127.0.0.1 is in use (another server?); choose one with --port"
    )


def test_serving_a_folder_that_holds_no_index_is_one_line_error(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--index", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_file_name_that_is_not_utf8_is_served_exactly(tmp_path, small_model) -> None:
    import os

    name = os.fsdecode(b"caf\xe9.png")  # Latin-1: a surrogate escape in Python's str
    try:
        make_image(tmp_path / "photos" / "odd" / name, size=(48, 48), seed=5)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    make_image(tmp_path / "photos" / "odd" / "plain.png", size=(48, 48), seed=6)
    Index.create(
        tmp_path / "ix", tmp_path / "photos", IndexOptions(weights=str(small_model))
    ).close()
    with Index.open(tmp_path / "ix") as ix, client_for(ix) as c:
        page = c.get("/api/images")
        assert page.status_code == 200 and "\\udce9" in page.text  # escaped, as --json prints
        paths = {os.fsencode(r["path"]) for r in page.json()["images"]}
        assert os.fsencode(str(tmp_path / "photos" / "odd" / name)) in paths
        odd = next(r for r in page.json()["images"] if r["path"].endswith(name))
        assert c.get(odd["image_url"]).content == (tmp_path / "photos" / "odd" / name).read_bytes()
