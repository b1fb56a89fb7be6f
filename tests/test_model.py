"""The network: torchvision's names, the paper's options, fc7 where the paper takes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from retrieval.extraction import extract_images
from retrieval.extraction.types import ExtractOptions
from retrieval.model.alexnet import FC7_DIM, AlexNet, ModelArgs, build_alexnet, init_as_paper
from retrieval.model.weights import load_model


def test_torchvision_state_dict_loads_unchanged() -> None:
    reference = torchvision.models.alexnet()
    ours = AlexNet()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)


def test_paper_variant_keeps_names_and_has_paper_filters() -> None:
    model = AlexNet(ModelArgs(arch="paper"))
    assert list(model.state_dict()) == list(AlexNet().state_dict())
    conv_widths = [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert conv_widths == [96, 256, 384, 384, 256]
    lrn = [m for m in model.modules() if isinstance(m, torch.nn.LocalResponseNorm)]
    assert len(lrn) == 2 and lrn[0].size == 5 and lrn[0].k == 2.0
    pools = [m for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
    assert all(p.kernel_size == 3 and p.stride == 2 for p in pools)  # overlapping pooling


def test_channels_and_classes_options() -> None:
    model = AlexNet(ModelArgs(in_channels=1, num_classes=10)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 10)
        assert model.forward_fc7(torch.rand(2, 1, 64, 64)).shape == (2, FC7_DIM)


def test_fc7_is_after_the_second_fully_connected_relu() -> None:
    model = build_alexnet(seed=1).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        fc7 = model.forward_fc7(x)
        classifier = model.classifier
        expected = classifier[5](
            classifier[4](classifier[2](classifier[1](model.forward_features(x))))
        )
        assert torch.equal(fc7, expected)
        assert (fc7 >= 0).all()
        assert torch.allclose(model.forward_head(fc7), model(x))


def _unfolded(model: AlexNet, x: torch.Tensor) -> torch.Tensor:
    """The classifier on the pooled 6x6 map, as torchvision computes it."""
    return model.classifier(torch.flatten(model.avgpool(model.features(x)), 1))


@pytest.mark.parametrize("arch", ["torchvision", "paper"])
def test_small_inputs_fold_fc6_and_give_the_same_outputs_and_gradients(arch: str) -> None:
    model = build_alexnet(ModelArgs(arch=arch, in_channels=1, num_classes=5, dropout=0.0), seed=3)
    x = torch.rand(4, 1, 64, 64)
    assert model.features(x).shape[-2:] == (1, 1)  # the case the fold is for
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _unfolded(model, x), rtol=1e-5, atol=1e-6)
        fc7 = model.forward_fc7(x)
        torch.testing.assert_close(model.forward_head(fc7), model(x))
    model.train()  # dropout 0: the fold is exact in training too
    grads = []
    for forward in (model, lambda x: _unfolded(model, x)):
        model.zero_grad()
        forward(x).square().sum().backward()
        grads.append(model.classifier[1].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_live_dropout_is_not_folded() -> None:
    """Dropout draws one mask per pooled cell; folding would share it across the 36 copies."""
    model = build_alexnet(ModelArgs(in_channels=1, num_classes=5, dropout=0.5), seed=3).train()
    x = torch.rand(4, 1, 64, 64)
    torch.manual_seed(0)
    ours = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(ours, _unfolded(model, x))


def test_paper_init_sets_the_papers_biases() -> None:
    model = AlexNet(ModelArgs(arch="paper"))
    init_as_paper(model)
    assert torch.all(model.features[3].bias == 1) and torch.all(model.features[0].bias == 0)
    assert abs(model.features[0].weight.std().item() - 0.01) < 1e-3


def test_seeded_builds_are_identical() -> None:
    a, b = build_alexnet(seed=7), build_alexnet(seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fc7_equals_plain_torchvision_alexnet_on_a_file(tmp_path) -> None:
    """Issue 3: our pipeline vs torchvision's own model and preset transforms, same weights."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((300, 380, 3)) * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)

    reference = torchvision.models.alexnet().eval()
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    transform = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
        pool = torch.flatten(reference.avgpool(reference.features(x)), 1)
        expected = reference.classifier[:6](pool).numpy()

    loaded = load_model(tmp_path / "weights.pt")
    features, records = extract_images([path], loaded, ExtractOptions(device="cpu"))
    assert records[0].ok
    assert np.abs(features - expected).max() <= 1e-4


@pytest.mark.cuda
def test_fc7_on_cuda_matches_cpu(tmp_path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "photo.png"
    Image.fromarray((rng.random((240, 260, 3)) * 255).astype(np.uint8)).save(path)
    cpu, _ = extract_images([path], load_model("random"), ExtractOptions(device="cpu"))
    gpu, _ = extract_images([path], load_model("random"), ExtractOptions(device="cuda"))
    assert np.abs(cpu - gpu).max() <= 1e-3
