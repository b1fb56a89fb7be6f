"""AlexNet in torchvision's layout, with the paper's and the seeds' options, and the fc7 extractor.

The parameter names are torchvision's (``features.0.weight`` ... ``classifier.6.bias``), so
torchvision's ImageNet state dict loads unchanged. The variants are options of the same class:

- ``arch="paper"`` (Krizhevsky et al. 2012, section 3): 96/256/384/384/256 filters and local
  response normalisation, which sits inside the ReLU slot of ``features`` (a parameter-free
  ``Sequential``), so no index shifts;
- ``groups=2``: the paper's two-GPU split (section 3.2): conv2, conv4 and conv5 see only the half
  of the previous layer's maps on their own GPU; conv3 and the FC layers see all of them;
- ``arch="cifar"``: a 32-px network with small kernels (conv 3->64 k4 s2, 2x2 pools, FC 4608);
- ``batch_norm=True``: batch norm after every convolution and hidden FC layer, before its ReLU.
  Indices then shift as in torchvision's ``vgg*_bn``; ``AlexNet.layers`` maps the paper's layer
  names to module names for every variant.

``forward`` is torchvision's computation, plain enough for ``torch.fx`` and
``torchvision.models.feature_extraction``. ``run_classifier`` is the faster equivalent for small
inputs (the fc6 fold); the mapper and the training loop call it explicitly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("torchvision", "paper", "cifar")
GROUPS = (1, 2)

# fc7 of the plain variants is the output of classifier[:6] (classifier.5, the second FC's ReLU).
FC7_END = 6
FC7_DIM = 4096
# Below 63 px the third max-pool sees a map smaller than its 3x3 window (cifar: below 10 px).
MIN_IMAGE_SIZE = 63
MIN_IMAGE_SIZES = {"torchvision": 63, "paper": 63, "cifar": 10}

# (out channels, kernel, stride, padding) of conv1..conv5, the pools (kernel, stride) after
# conv1, conv2 and conv5, and the width of fc6 and fc7.
_SHAPES = {
    "torchvision": (
        [(64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)],
        [(3, 2), (3, 2), (3, 2)],
        4096,
    ),
    "paper": (
        [(96, 11, 4, 2), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)],
        [(3, 2), (3, 2), (3, 2)],
        4096,
    ),
    "cifar": (
        [(64, 4, 2, 1), (256, 3, 1, 1), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)],
        [(2, 1), (2, 2), (2, 1)],
        4608,
    ),
}
# The paper's split: these convolutions see only their own GPU's half of the previous layer.
_GROUPED = {"conv2", "conv4", "conv5"}


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    arch: str = "torchvision"
    in_channels: int = 3
    num_classes: int = 1000
    dropout: float = 0.5
    batch_norm: bool = False
    groups: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelArgs:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @property
    def min_image_size(self) -> int:
        return MIN_IMAGE_SIZES[self.arch]


def _relu(lrn: bool) -> nn.Module:
    if not lrn:
        return nn.ReLU(inplace=True)
    # Paper section 3.3: k=2, n=5, alpha=1e-4, beta=0.75, applied after the ReLU.
    return nn.Sequential(
        nn.ReLU(inplace=True), nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)
    )


class AlexNet(nn.Module):
    """torchvision's AlexNet; see the module docstring for the options in :class:`ModelArgs`."""

    def __init__(self, args: ModelArgs | None = None) -> None:
        super().__init__()
        self.args = args = args or ModelArgs()
        if args.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {args.arch!r}; expected one of {ARCHITECTURES}")
        if args.groups not in GROUPS:
            raise ValueError(f"groups must be one of {GROUPS}, not {args.groups}")
        convs, pools, hidden = _SHAPES[args.arch]
        lrn = args.arch == "paper"
        # The paper's names -> module names (the output after each layer's ReLU or pool).
        self.layers: dict[str, str] = {}
        features: list[nn.Module] = []
        previous = args.in_channels
        pool_after = {"conv1": pools[0], "conv2": pools[1], "conv5": pools[2]}
        for number, (width, kernel, stride, padding) in enumerate(convs, start=1):
            name = f"conv{number}"
            groups = args.groups if name in _GROUPED else 1
            features.append(nn.Conv2d(previous, width, kernel, stride, padding, groups=groups))
            self.layers[f"{name}.conv"] = f"features.{len(features) - 1}"
            if args.batch_norm:
                features.append(nn.BatchNorm2d(width))
            features.append(_relu(lrn and number <= 2))
            self.layers[name] = f"features.{len(features) - 1}"
            if name in pool_after:
                features.append(nn.MaxPool2d(*pool_after[name]))
                self.layers[f"pool{number}"] = f"features.{len(features) - 1}"
            previous = width
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        classifier: list[nn.Module] = []
        inputs = previous * 6 * 6
        for name in ("fc6", "fc7"):
            classifier += [nn.Dropout(p=args.dropout), nn.Linear(inputs, hidden)]
            self.layers[f"{name}.linear"] = f"classifier.{len(classifier) - 1}"
            if args.batch_norm:
                classifier.append(nn.BatchNorm1d(hidden))
            classifier.append(nn.ReLU(inplace=True))
            self.layers[name] = f"classifier.{len(classifier) - 1}"
            inputs = hidden
        # fc7 is classifier[:fc7_end]: up to and including the second FC layer's ReLU.
        self.fc7_end = len(classifier)
        classifier.append(nn.Linear(hidden, args.num_classes))
        self.classifier = nn.Sequential(*classifier)

    @property
    def fc7_dim(self) -> int:
        """Width of fc7, the layer an index stores (4096; 4608 for the cifar variant)."""
        return int(self.fc_layers()[1][1].out_features)

    def conv_layers(self) -> list[tuple[str, nn.Conv2d]]:
        """``(conv1..conv5, module)`` in order."""
        modules = dict(self.named_modules())
        return [(f"conv{i}", modules[self.layers[f"conv{i}.conv"]]) for i in range(1, 6)]

    def fc_layers(self) -> list[tuple[str, nn.Linear]]:
        """``(fc6, fc7, fc8, module)`` in order."""
        modules = dict(self.named_modules())
        hidden = [(n, modules[self.layers[f"{n}.linear"]]) for n in ("fc6", "fc7")]
        return [*hidden, ("fc8", self.classifier[-1])]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened pool5 map (the input of the classifier)."""
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward_fc7(self, x: torch.Tensor) -> torch.Tensor:
        """fc7: the activations after the second fully-connected layer's ReLU."""
        return self.classifier[: self.fc7_end](self.forward_features(x))

    def forward_head(self, fc7: torch.Tensor) -> torch.Tensor:
        return self.classifier[self.fc7_end :](fc7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)

    def forward_folded(self, x: torch.Tensor, *, fc7: bool = False) -> torch.Tensor:
        """The same logits (or with ``fc7``, fc7) as ``forward``, with fc6 folded where that
        gives the same numbers (1x1 pool5 maps, dropout off): what training calls for speed."""
        head = self.classifier[: self.fc7_end] if fc7 else self.classifier
        return run_classifier(self.features(x), self.avgpool, head)


def folded_fc6_weight(fc6: nn.Linear, channels: int, cells: int) -> torch.Tensor:
    """fc6's weight with the ``cells`` copies of each channel summed: ``out x channels``."""
    return fc6.weight.view(fc6.out_features, channels, cells).sum(-1)


def can_fold(maps: torch.Tensor, avgpool: nn.Module, head: nn.Sequential) -> bool:
    """Whether ``head(flatten(avgpool(maps)))`` may take the fc6 fold (see ``run_classifier``)."""
    dropout, fc6 = head[0], head[1]
    cells = copies_per_channel(avgpool)
    return bool(
        maps.shape[-2:] == (1, 1)
        and cells
        and type(fc6) is nn.Linear  # not a quantised layer
        and fc6.in_features == maps.shape[1] * cells
        and isinstance(dropout, nn.Dropout)
        and not (dropout.training and dropout.p > 0)
    )


def run_classifier(
    maps: torch.Tensor,
    avgpool: nn.Module,
    head: nn.Sequential,
    folded_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``head(flatten(avgpool(maps)))`` for a head that starts with dropout and fc6.

    At 63-95 px input the pool5 maps are 1x1, and the adaptive pool only copies each channel
    into its 36 cells; fc6 then equals a linear layer whose weights are the 36 cells' weights
    summed. That layer has 36x fewer multiply-adds than fc6, the largest layer of a small-input
    network (forward ~1.4x faster at 64 px on a CPU), and gives the same numbers up to float
    rounding. Not while dropout is live: it would drop each of the 36 copies separately.
    ``folded_weight`` is the summed weight computed beforehand (for fixed weights, as in the
    mapper); without it the sum is taken here, so gradients flow into fc6 as usual.
    """
    if not can_fold(maps, avgpool, head):
        return head(torch.flatten(avgpool(maps), 1))
    fc6 = head[1]
    if folded_weight is None:
        folded_weight = folded_fc6_weight(fc6, maps.shape[1], copies_per_channel(avgpool))
    return head[2:](F.linear(maps.flatten(1), folded_weight, fc6.bias))


def copies_per_channel(avgpool: nn.Module) -> int:
    """Output cells of an adaptive average pool (each a copy of a 1x1 input); 0 if unknown."""
    if not isinstance(avgpool, nn.AdaptiveAvgPool2d):
        return 0
    size = avgpool.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return 0 if None in size else math.prod(size)


def init_as_paper(model: AlexNet) -> None:
    """Paper section 5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC
    layers (so the ReLUs start with positive inputs), 0 elsewhere."""
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, module in [*model.conv_layers(), *model.fc_layers()]:
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.constant_(module.bias, 1.0 if name in ones else 0.0)


def build_alexnet(args: ModelArgs | None = None, *, seed: int | None = None) -> AlexNet:
    """A fresh AlexNet; with ``seed`` its initial weights are reproducible."""
    if seed is None:
        return AlexNet(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AlexNet(args)
