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


def test_forward_is_torchvisions_computation_and_traces_for_feature_extraction() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    model = build_alexnet(ModelArgs(num_classes=5, dropout=0.0), seed=2).eval()
    x = torch.rand(2, 3, 64, 64)
    extractor = create_feature_extractor(model, {"classifier.5": "fc7", "classifier.6": "out"})
    with torch.no_grad():
        got = extractor(x)
        assert torch.equal(model(x), _unfolded(model, x))  # no fold inside forward
        assert torch.equal(got["out"], model(x))
        assert torch.equal(got["fc7"], model.forward_fc7(x))


@pytest.mark.parametrize("arch", ["torchvision", "paper"])
def test_small_inputs_fold_fc6_and_give_the_same_outputs_and_gradients(arch: str) -> None:
    model = build_alexnet(ModelArgs(arch=arch, in_channels=1, num_classes=5, dropout=0.0), seed=3)
    x = torch.rand(4, 1, 64, 64)
    assert model.features(x).shape[-2:] == (1, 1)  # the case the fold is for
    model.eval()
    with torch.no_grad():
        # The reference is the plain forward: torchvision's computation, no fold in it.
        torch.testing.assert_close(model.forward_folded(x), model(x), rtol=1e-5, atol=1e-6)
        fc7 = model.forward_folded(x, fc7=True)
        torch.testing.assert_close(fc7, model.forward_fc7(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.forward_head(fc7), model(x), rtol=1e-5, atol=1e-6)
    model.train()  # dropout 0: the fold is exact in training too
    grads = []
    for forward in (model.forward_folded, model):
        model.zero_grad()
        forward(x).square().sum().backward()
        grads.append(model.classifier[1].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_live_dropout_is_not_folded() -> None:
    """Dropout draws one mask per pooled cell; folding would share it across the 36 copies."""
    model = build_alexnet(ModelArgs(in_channels=1, num_classes=5, dropout=0.5), seed=3).train()
    x = torch.rand(4, 1, 64, 64)
    torch.manual_seed(0)
    ours = model.forward_folded(x)
    torch.manual_seed(0)
    torch.testing.assert_close(ours, _unfolded(model, x))


def test_mapper_folds_once_and_matches_the_unfolded_fc7_at_64_px() -> None:
    from retrieval.extraction.mapper import Fc7Mapper
    from retrieval.model.preprocess import Preprocessing
    from retrieval.model.weights import LoadedModel

    model = build_alexnet(ModelArgs(num_classes=4), seed=5).eval()
    prep = Preprocessing(resize=73, crop=64)
    loaded = LoadedModel(model, prep, sha256="x", source="test")
    mapper = Fc7Mapper(loaded, torch.device("cpu"), channels_last=False)
    assert mapper.module.folded_fc6 is not None and mapper.module.folded_fc6.shape == (4096, 256)
    crops = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.forward_fc7(prep.normalize(crops))  # no fold in the reference
    torch.testing.assert_close(mapper(crops), expected, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("arch", ["torchvision", "paper", "cifar"])
def test_every_variant_gives_logits_fc7_and_a_folded_path_that_agree(
    arch: str, groups: int, batch_norm: bool
) -> None:
    args = ModelArgs(arch=arch, num_classes=7, batch_norm=batch_norm, groups=groups)
    model = build_alexnet(args, seed=1).eval()
    size = 32 if arch == "cifar" else 64
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        fc7 = model.forward_fc7(x)
        assert fc7.shape == (2, model.fc7_dim) and (fc7 >= 0).all()
        modules = dict(model.named_modules())
        assert isinstance(modules[model.layers["fc7"]], torch.nn.ReLU)
        torch.testing.assert_close(model.forward_head(fc7), model(x))
        torch.testing.assert_close(model.forward_folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert model.fc7_dim == (4608 if arch == "cifar" else 4096)


def test_cifar_variant_is_seed_003s_network() -> None:
    model = AlexNet(ModelArgs(arch="cifar", num_classes=10))
    convs = [m for _, m in model.conv_layers()]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (3, 64, 4), (64, 256, 3), (256, 384, 3), (384, 384, 3), (384, 256, 3)
    ]  # fmt: skip
    assert convs[0].stride == (2, 2)
    pools = [(m.kernel_size, m.stride) for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
    assert pools == [(2, 1), (2, 2), (2, 1)]
    fcs = [(m.in_features, m.out_features) for _, m in model.fc_layers()]
    assert fcs == [(9216, 4608), (4608, 4608), (4608, 10)]
    assert model.features(torch.rand(1, 3, 32, 32)).shape == (1, 256, 6, 6)


def test_batch_norm_follows_every_conv_and_hidden_fc_layer() -> None:
    model = AlexNet(ModelArgs(batch_norm=True))
    layers = list(model.features) + list(model.classifier)
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, torch.nn.Conv2d):
            assert isinstance(layers[i + 1], torch.nn.BatchNorm2d)
        if isinstance(layer, torch.nn.Linear):
            assert isinstance(layers[i + 1], torch.nn.BatchNorm1d)
    assert sum(isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in layers) == 7


def test_two_groups_split_conv2_conv4_conv5_as_the_papers_two_gpus() -> None:
    model = AlexNet(ModelArgs(arch="paper", groups=2))
    groups = {name: conv.groups for name, conv in model.conv_layers()}
    assert groups == {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
    conv2 = model.conv_layers()[1][1]
    assert conv2.weight.shape == (256, 48, 5, 5)  # each kernel sees its own GPU's 48 maps
    # conv2's first 128 maps depend only on conv1's first 48 maps: zeroing the rest changes none.
    x = torch.rand(1, 96, 27, 27)
    cut = x.clone()
    cut[:, 48:] = 0
    with torch.no_grad():
        torch.testing.assert_close(conv2(x)[:, :128], conv2(cut)[:, :128])
        assert not torch.allclose(conv2(x)[:, 128:], conv2(cut)[:, 128:])


@pytest.mark.parametrize(
    "args",
    [
        ModelArgs(arch="cifar", num_classes=10),
        ModelArgs(arch="paper", groups=2, num_classes=3),
        ModelArgs(batch_norm=True, in_channels=1, num_classes=4),
        ModelArgs(arch="cifar", batch_norm=True, groups=2),
    ],
)
def test_plain_state_dicts_of_each_variant_load_with_their_architecture(tmp_path, args) -> None:
    path = tmp_path / "plain.pt"
    torch.save(build_alexnet(args, seed=0).state_dict(), path)
    assert load_model(path).args == args
