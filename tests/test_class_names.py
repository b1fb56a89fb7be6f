"""Readable names for WordNet-id class folders: words.txt beside the data, or the names a
checkpoint records; shown by the grid, the page's JSON and evaluate, never only the id."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from retrieval.images.class_names import display_name, name_of, names_for, read_words
from retrieval.model.weights import load_model
from retrieval.results import Neighbor, QueryResult
from tests.corpus import make_labelled_folder

WNIDS = ["n01440764", "n02102040", "n02979186"]
WORDS = "n01440764\ttench, Tinca tinca\nn02102040\tEnglish springer\nn02979186\tcassette player\n"
NAMES = ["tench", "English springer", "cassette player"]


def wnid_folder(root: Path, per_class: int = 4, size: int = 48) -> Path:
    """root/CLASS/NN.png with WordNet ids for class folders, and root/words.txt."""
    made = make_labelled_folder(root, classes=3, per_class=per_class, size=size)
    for wnid, shape in zip(WNIDS, made, strict=True):
        (root / shape).rename(root / wnid)
    (root / "words.txt").write_text(WORDS)
    return root


def test_words_txt_is_read_in_imagenets_layout(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text(WORDS + "not a line\nn123\tshort id\nn03888257\tparachute, chute\n")
    names = read_words(path)
    assert names == {**dict(zip(WNIDS, NAMES, strict=True)), "n03888257": "parachute"}
    assert display_name("n01440764", names) == "tench"
    assert display_name("n01440764", names, with_id=True) == "tench (n01440764)"
    assert display_name("cats", names) == "cats"  # not a WordNet id: its own name


def test_the_nearest_words_txt_names_the_classes(tmp_path: Path) -> None:
    wnid_folder(tmp_path / "data" / "train")
    (tmp_path / "data" / "words.txt").write_text("n01440764\tfar away\n")
    image = next((tmp_path / "data" / "train" / "n01440764").iterdir())
    assert name_of("n01440764", image) == "tench"  # data/train/words.txt is nearer
    assert names_for(WNIDS, tmp_path / "data" / "train") == dict(zip(WNIDS, NAMES, strict=True))
    (tmp_path / "data" / "train" / "words.txt").unlink()
    assert name_of("n01440764", image) == "far away"  # two folders up
    assert name_of("n01440764", tmp_path / "elsewhere" / "x.png") is None


def test_the_grid_labels_tiles_with_readable_names(tmp_path: Path, monkeypatch) -> None:
    from retrieval.figures import grid

    data = wnid_folder(tmp_path / "data")
    paths = {w: sorted((data / w).iterdir()) for w in WNIDS}
    result = QueryResult(
        str(paths[WNIDS[0]][0]),
        [Neighbor(i + 1, str(paths[w][1]), 1.0 + i, w, i) for i, w in enumerate(WNIDS)],
    )
    drawn: list[str] = []
    real = grid._fit_text
    monkeypatch.setattr(
        grid, "_fit_text", lambda d, text, f, w: drawn.append(text) or real(d, text, f, w)
    )
    grid.render_grid([result], tmp_path / "grid.png", tile=64)
    assert drawn == ["tench", *NAMES]  # the query's folder, then each neighbour's
    assert not any(w in text for w in WNIDS for text in drawn)


def test_the_pages_json_names_wordnet_id_folders(tmp_path: Path, small_model: Path) -> None:
    from starlette.testclient import TestClient

    from retrieval import Index, IndexOptions
    from retrieval.serve import ServeOptions, create_app

    data = wnid_folder(tmp_path / "photos")
    Index.create(tmp_path / "index", data, IndexOptions(weights=str(small_model))).close()
    with (
        Index.open(tmp_path / "index") as index,
        TestClient(create_app(index, ServeOptions(warm_model=False))) as client,
    ):
        rows = client.get("/api/images").json()["images"]
        assert {(r["label"], r["name"]) for r in rows} == set(zip(WNIDS, NAMES, strict=True))
        answer = client.get(f"/api/neighbors/{rows[0]['id']}?k=5").json()
        assert all(n["name"] == NAMES[WNIDS.index(n["label"])] for n in answer["neighbors"])


def test_training_records_the_names_and_evaluate_shows_them_without_the_data(
    tmp_path: Path,
) -> None:
    from retrieval.cli.main import cli

    wnid_folder(tmp_path / "data" / "train", per_class=6)
    wnid_folder(tmp_path / "data" / "val", per_class=2)
    (tmp_path / "data" / "words.txt").write_text(WORDS)
    for split in ("train", "val"):
        (tmp_path / "data" / split / "words.txt").unlink()  # only DATA/words.txt, as ImageNet
    out = tmp_path / "m.pt"
    args = ["train", str(tmp_path / "data"), "-o", str(out), "--image-size", "64", "--epochs", "1"]
    result = CliRunner().invoke(cli, [*args, "--batch-size", "6", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert load_model(out).class_names == dict(zip(WNIDS, NAMES, strict=True))

    (tmp_path / "data" / "words.txt").unlink()  # the checkpoint's names are enough
    args = ["evaluate", str(tmp_path / "data"), "--weights", str(out), "--no-ten-crop"]
    result = CliRunner().invoke(cli, [*args, "--workers", "0"])
    assert result.exit_code == 0, result.output
    for wnid, name in zip(WNIDS, NAMES, strict=True):
        assert f"  {name} ({wnid}): " in result.stdout
