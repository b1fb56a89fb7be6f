"""One progress convention: the library reports through progress(what, done, total) callbacks
and draws no bar of its own; the CLI draws them (on stderr)."""

from __future__ import annotations

import sys
from pathlib import Path

from retrieval.training.loop import make_recipe, train
from retrieval.training.prepare import RunOptions
from tests.corpus import make_labelled_folder


def test_training_reports_every_stage_through_the_callback(tmp_path: Path) -> None:
    make_labelled_folder(tmp_path / "d" / "train", classes=3, per_class=6, size=48)
    make_labelled_folder(tmp_path / "d" / "val", classes=3, per_class=2, size=48)
    calls: list[tuple[str, int, int]] = []
    recipe = make_recipe("onecycle", image_size=64, epochs=1, batch_size=9)
    options = RunOptions(workers=0, progress=lambda *call: calls.append(call))
    assert train(tmp_path / "d", tmp_path / "m.pt", recipe, options).finished
    stages = {what.split(" loss")[0] for what, _, _ in calls}
    assert {"decoding", "epoch 1/1", "evaluating"} <= stages
    assert all(0 <= done <= total for _, done, total in calls)
    steps = [done for what, done, _ in calls if what.startswith("epoch 1/1 loss")]
    assert steps == [1, 2]  # 18 images in batches of 9


def test_the_library_draws_no_bars() -> None:

    for name, module in sys.modules.items():
        if name.startswith("retrieval.") and not name.startswith("retrieval.cli"):
            assert "tqdm" not in vars(module), name
