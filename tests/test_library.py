"""retrieval.Index: one object, opened once; the same answers as the CLI, from threads too."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from retrieval import Index, IndexOptions
from retrieval.cli.main import cli
from retrieval.errors import IndexMismatchError, WeightsError
from tests.corpus import make_image, make_labelled_folder


def run(*args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


@pytest.fixture
def built(photos: Path, tmp_path: Path, small_model: Path) -> tuple[Path, Path]:
    """(images folder, index folder), indexed with the small checkpoint in fp32 (some tests
    compare with fp32 references; auto would be bf16 where it is native)."""
    index_dir = tmp_path / "index"
    run("index", photos, "--index", index_dir, "--weights", small_model, "--precision", "fp32")
    return photos, index_dir


def test_index_search_gives_what_query_json_prints(built) -> None:
    photos, index_dir = built
    query = sorted(photos.rglob("*.png"))[3]
    printed = json.loads(run("query", query, "-k", "6", "--index", index_dir, "--json"))
    with Index.open(index_dir) as ix:
        (result,) = ix.search([query], k=6)
    same = result.to_dict()
    for mine, theirs in zip(same["neighbors"], printed["neighbors"], strict=True):
        assert mine.pop("distance") == pytest.approx(theirs.pop("distance"), rel=1e-5, abs=1e-6)
    assert same == printed  # paths, ids, labels, ranks exactly; distances to float rounding
    assert result.neighbors[0].path == str(query) and result.neighbors[0].distance < 1e-3
    assert all(Path(n.path).is_absolute() for n in result.neighbors)


def test_bytes_and_pil_queries_match_the_file_query(built) -> None:
    photos, index_dir = built
    query = sorted(photos.rglob("*.png"))[5]
    with Index.open(index_dir) as ix:
        by_file, by_bytes, by_image = ix.search([query], k=4) + ix.search(
            [query.read_bytes(), Image.open(query)], k=4
        )
    for other in (by_bytes, by_image):
        assert [n.id for n in other.neighbors] == [n.id for n in by_file.neighbors]
        np.testing.assert_allclose(
            [n.distance for n in other.neighbors],
            [n.distance for n in by_file.neighbors],
            atol=1e-4,
        )


def test_bad_uploads_get_the_reason_a_bad_file_gets(built) -> None:
    _, index_dir = built
    with Index.open(index_dir) as ix:
        empty, text, ok = ix.search([b"", b"hello, not an image", _png_bytes()], k=2)
    assert empty.error == "empty file" and not empty.neighbors
    assert text.error.startswith("not an image") and not text.neighbors
    assert ok.error is None and len(ok.neighbors) == 2


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_neighbors_of_an_id_equal_a_search_by_its_file_leaving_itself_out(built) -> None:
    photos, index_dir = built
    query = sorted(photos.rglob("*.png"))[2]
    with Index.open(index_dir) as ix:
        (by_file,) = ix.search([query], k=5, exclude_self=True)
        own = ix.id_of(query)
        (by_id,) = ix.neighbors([own], k=5)
        assert by_id.query_id == own and by_id.query == str(query)
        assert [n.id for n in by_id.neighbors] == [n.id for n in by_file.neighbors]
        assert own not in [n.id for n in by_id.neighbors]
        features, _ = ix.embed([query])
        np.testing.assert_allclose(ix.vectors([own])[0], features[0], atol=1e-5)
        with pytest.raises(KeyError):
            ix.neighbors([10_000], k=2)


def test_search_vectors_is_exact_knn_against_numpy(built) -> None:
    _, index_dir = built
    with Index.open(index_dir) as ix:
        rows = ix.rows(limit=None)
        stored = ix.vectors([r.id for r in rows])
        ids = np.array([r.id for r in rows])
        rng = np.random.default_rng(0)
        queries = stored[:3] + rng.normal(0, 0.1, stored[:3].shape).astype(np.float32)
        distances, found = ix.search_vectors(queries, k=4)
    brute = np.sqrt(((queries[:, None, :] - stored[None]) ** 2).sum(-1))
    order = np.argsort(brute, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(distances, np.take_along_axis(brute, order, 1), rtol=1e-5)


def test_rows_filter_by_label_and_path_substring_and_page(built) -> None:
    _, index_dir = built
    with Index.open(index_dir) as ix:
        labels = ix.labels()
        assert sum(labels.values()) == ix.count == 12 and len(labels) == 3
        label = next(iter(labels))
        picked = ix.rows(label=label, limit=100)
        assert len(picked) == labels[label] and {r.label for r in picked} == {label}
        assert ix.count_rows(label=label) == labels[label]
        page1, page2 = ix.rows(limit=5), ix.rows(offset=5, limit=5)
        assert len(page1) == 5 and len(page2) == 5
        assert not {r.id for r in page1} & {r.id for r in page2}
        needle = Path(picked[0].path).name
        assert all(needle in r.path for r in ix.rows(contains=needle))
        by_id = ix.rows([picked[1].id, picked[0].id, 99_999])
        assert [r.id for r in by_id] == [picked[1].id, picked[0].id]


def test_searches_from_many_threads_agree_with_one_thread(built) -> None:
    photos, index_dir = built
    queries = sorted(photos.rglob("*.png"))
    with Index.open(index_dir) as ix:
        expected = {str(q): ix.search([q], k=3)[0].to_dict() for q in queries}
        got: dict[str, dict] = {}
        errors: list[BaseException] = []

        def work(chunk: list[Path]) -> None:
            try:
                for q in chunk:
                    got[str(q)] = ix.search([q], k=3)[0].to_dict()
                    ix.neighbors([ix.id_of(q)], k=2)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(queries[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and got == expected


def test_reload_picks_up_a_new_generation_while_searches_run(built, tmp_path: Path) -> None:
    photos, index_dir = built
    query = sorted(photos.rglob("*.png"))[0]
    with Index.open(index_dir) as reader, Index.open(index_dir) as writer:
        assert reader.count == 12
        stop, errors, counts = threading.Event(), [], set()

        def keep_searching() -> None:
            while not stop.is_set():
                try:
                    result = reader.search([query], k=2)[0]
                    assert result.neighbors[0].distance < 1e-3
                    counts.add(reader.count)
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    return

        searcher = threading.Thread(target=keep_searching)
        searcher.start()
        extra = tmp_path / "extra"
        shutil.copytree(photos, extra)
        writer.update(extra)
        assert writer.count == 24
        assert reader.reload() is True and reader.count == 24 and reader.reload() is False
        stop.set()
        searcher.join()
    assert not errors and counts <= {12, 24}


def test_a_reload_after_a_rebuild_at_another_precision_embeds_at_the_new_one(
    built, tmp_path: Path, small_model: Path
) -> None:
    """The model of an fp32 index was loaded (its precision resolved to fp32); the index is
    rebuilt in bf16: after the reload, queries are embedded in bf16, not refused as fp32."""
    photos, index_dir = built
    query = sorted(photos.rglob("*.png"))[0]
    with Index.open(index_dir) as ix:
        assert ix.search([query], k=1)[0].neighbors[0].distance < 1e-3
        assert ix.precision == "fp32"
        rebuild = ["--weights", small_model, "--precision", "bf16", "--rebuild"]
        run("index", photos, "--index", index_dir, *rebuild)
        assert ix.reload() is True and ix.identity.precision == "bf16"
        result = ix.search([query], k=1)[0]
        assert result.error is None and ix.precision in ("bf16", "fp32")
        if ix.precision == "bf16":  # native here: the image finds itself
            assert result.neighbors[0].distance < 1e-3


def test_update_embeds_with_the_indexs_preprocessing_not_the_weights_file_default(
    tmp_path: Path, small_model: Path
) -> None:
    """A plain state dict of the same weights comes with ImageNet preprocessing (224 px); the
    index's 64-px preprocessing is used instead, so its vectors match the indexed ones."""
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(small_model, weights_only=True)["model"], plain)
    folder = tmp_path / "a"
    make_labelled_folder(folder, classes=2, per_class=3, size=48)
    index_dir = tmp_path / "index"
    run("index", folder, "--index", index_dir, "--weights", small_model)
    more = tmp_path / "b"
    shutil.copytree(folder, more)
    run("index", more, "--index", index_dir, "--weights", plain)
    with Index.open(index_dir) as ix:
        assert ix.identity.preprocessing["crop"] == 64
        for row in ix.rows(under=str(folder), limit=None):
            twin = ix.id_of(str(more / Path(row.path).relative_to(folder)))
            np.testing.assert_allclose(ix.vectors([row.id]), ix.vectors([twin]), atol=1e-5)


def test_other_weights_and_other_precision_are_refused_naming_the_part(
    built, tmp_path: Path
) -> None:
    photos, index_dir = built
    with pytest.raises(IndexMismatchError, match="weights: the index has"):
        Index.open(index_dir, weights="random:3").search([sorted(photos.rglob("*.png"))[0]])
    result = CliRunner().invoke(
        cli, ["index", str(photos), "--index", str(index_dir), "--precision", "bf16"]
    )
    assert result.exit_code == 1 and "precision: the index has fp32" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_an_index_built_with_a_relative_weights_path_answers_from_anywhere(
    photos: Path, tmp_path: Path, small_model: Path, monkeypatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(small_model, work / "model.pt")
    monkeypatch.chdir(work)
    run("index", photos, "--index", "idx", "--weights", "model.pt")
    manifest = json.loads((work / "idx" / "manifest.json").read_text())
    assert manifest["model"]["source"] == str(work / "model.pt")
    monkeypatch.chdir(tmp_path)
    query = sorted(photos.rglob("*.png"))[0]
    assert json.loads(run("query", query, "--index", work / "idx", "-k", "1", "--json"))


def test_moved_weights_are_named_and_the_same_weights_elsewhere_are_accepted(
    built, tmp_path: Path, small_model: Path
) -> None:
    photos, _ = built
    moving = tmp_path / "moving.pt"
    shutil.copy(small_model, moving)
    index_dir = tmp_path / "moved-index"
    run("index", photos, "--index", index_dir, "--weights", moving)
    moved = tmp_path / "elsewhere.pt"
    moving.rename(moved)
    query = sorted(photos.rglob("*.png"))[0]
    with pytest.raises(WeightsError, match=r"no longer at .*moving\.pt"):
        Index.open(index_dir).search([query])
    with Index.open(index_dir, weights=str(moved)) as ix:
        assert ix.search([query], k=1)[0].neighbors[0].distance < 1e-3
    run("index", photos, "--index", index_dir, "--weights", moved)  # records the new place
    with Index.open(index_dir) as ix:
        assert ix.manifest["model"]["source"] == str(moved)
        assert ix.search([query], k=1)[0].neighbors[0].distance < 1e-3


def test_index_folder_on_one_already_indexed_file_is_a_no_op(built) -> None:
    from retrieval.build.run import index_folder

    photos, index_dir = built
    one = sorted(photos.rglob("*.png"))[0]
    report = index_folder(one, index_dir)
    assert report.added == 0 and report.unchanged == 1 and report.count == 12


def test_library_calls_leave_process_state_as_found(built, tmp_path: Path) -> None:
    photos, index_dir = built
    umask = os.umask(0o027)
    os.umask(umask)
    threads = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()
    with Index.open(index_dir) as ix:
        ix.update(photos, IndexOptions(rebuild=True))
        ix.search([sorted(photos.rglob("*.png"))[0]], k=2)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert os.umask(umask) == umask


def test_a_closed_index_refuses_calls(built) -> None:
    _, index_dir = built
    ix = Index.open(index_dir)
    ix.close()
    ix.close()  # twice is fine
    with pytest.raises(Exception, match="closed"):
        ix.search_vectors(np.zeros((1, ix.dim), np.float32), 1)


def test_k_outside_one_to_a_thousand_is_refused(built) -> None:
    photos, index_dir = built
    with Index.open(index_dir) as ix, pytest.raises(Exception, match="between 1 and 1000"):
        ix.search([sorted(photos.rglob("*.png"))[0]], k=0)


def test_create_indexes_a_folder_and_opens_it(tmp_path: Path, small_model: Path) -> None:
    folder = tmp_path / "pics"
    for i in range(3):
        make_image(folder / "x" / f"{i}.png", size=(40, 40), seed=i)
    with Index.create(tmp_path / "ix", folder, IndexOptions(weights=str(small_model))) as ix:
        assert ix.count == 3 and ix.backend == "exact-mapped-cpu"


def test_search_of_an_fc7_array_answers_as_search_of_its_image(built) -> None:
    photos, index_dir = built
    query = sorted(photos.rglob("*.png"))[4]
    with Index.open(index_dir) as ix:
        features, _ = ix.embed([query])
        (by_features,) = ix.search(features, k=3, names=["q"])
        (by_file,) = ix.search([query], k=3)
    assert by_features.query == "q" and by_features.neighbors == by_file.neighbors


def test_flip_averaged_embedding_is_the_mean_of_the_image_and_its_mirror(built, tmp_path) -> None:
    photos, index_dir = built
    query = sorted(photos.rglob("*.png"))[4]
    mirror = tmp_path / "mirror.png"
    Image.open(query).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirror)
    with Index.open(index_dir) as ix:
        (flipped,), _ = ix.embed([query], flip=True)
        (plain, mirrored), _ = ix.embed([query, mirror])
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, atol=1e-4)
