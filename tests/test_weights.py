"""Where weights come from, and what a checkpoint carries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from retrieval.errors import WeightsError
from retrieval.model.alexnet import ModelArgs, build_alexnet
from retrieval.model.preprocess import IMAGENET, Preprocessing
from retrieval.model.weights import load_model, save_checkpoint, state_dict_sha256


def _imagenet_cache() -> Path:
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / Path(url).name


def test_imagenet_weights_load_through_torchvisions_cache() -> None:
    """The real loading path: torchvision's weights API reading TORCH_HOME's cache."""
    state = torchvision.models.alexnet().state_dict()
    cache = _imagenet_cache()
    cache.parent.mkdir(parents=True)
    torch.save(state, cache)
    loaded = load_model("imagenet")
    assert loaded.sha256 == state_dict_sha256(state)
    assert loaded.preprocessing == IMAGENET
    assert loaded.classes is not None and len(loaded.classes) == 1000
    assert torch.equal(loaded.model.features[0].weight, state["features.0.weight"])


def test_imagenet_weights_offline_say_what_to_do(monkeypatch) -> None:
    import torch.hub

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError, match="--weights PATH") as info:
        load_model("imagenet")
    assert "\n" not in str(info.value)


def test_checkpoint_describes_itself(tmp_path: Path) -> None:
    model = build_alexnet(ModelArgs(arch="paper", in_channels=1, num_classes=4), seed=3)
    prep = Preprocessing(resize=72, crop=64, mean=(0.3,), std=(0.2,), channels=1)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, prep, classes=list("wxyz"), recipe={"name": "paper"}, epoch=2)
    loaded = load_model(path)
    assert loaded.args == model.args
    assert loaded.preprocessing == prep
    assert loaded.classes == list("wxyz")
    assert loaded.metadata["epoch"] == 2
    assert loaded.sha256 == state_dict_sha256(model.state_dict())


def test_plain_state_dict_infers_architecture(tmp_path: Path) -> None:
    model = build_alexnet(ModelArgs(arch="paper", num_classes=7), seed=0)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    loaded = load_model(tmp_path / "plain.pt")
    assert loaded.args.arch == "paper" and loaded.args.num_classes == 7


def test_random_weights_are_seeded() -> None:
    assert load_model("random:5").sha256 == load_model("random:5").sha256
    assert load_model("random:5").sha256 != load_model("random:6").sha256


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "cannot read weights"), (b"not a checkpoint at all", "cannot read weights")],
)
def test_corrupt_weights_file_is_one_clear_error(tmp_path: Path, content, message) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        load_model(path)


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    torch.save(torchvision.models.squeezenet1_0().state_dict(), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="not an AlexNet state dict"):
        load_model(tmp_path / "other.pt")


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_alexnet(seed=0), IMAGENET)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_model(path)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_preprocessing_equals_torchvisions_preset() -> None:
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (311, 257, 3), np.uint8))
    expected = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()(image)
    assert torch.equal(IMAGENET(image), expected)
