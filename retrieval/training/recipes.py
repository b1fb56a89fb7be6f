"""Training recipes: the paper's (section 5), OneCycle for short budgets, and fine-tuning
torchvision's ImageNet weights or any AlexNet checkpoint; and the network and learning-rate
schedule each one starts from.

A :class:`Recipe` holds everything that decides the trained weights (the seed included), so a
checkpoint that stores it says how it was made, and ``--resume`` continues with exactly it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import RetrieveError, WeightsError
from retrieval.model.alexnet import (
    ARCHITECTURES,
    GROUPS,
    MIN_IMAGE_SIZES,
    AlexNet,
    ModelArgs,
    init_as_paper,
)
from retrieval.training.augment import Augmentation
from retrieval.training.start import StartingPoint, load_into, load_start

RECIPES = ("paper", "onecycle")


SELECT = ("map", "top1")
CLIP_NORM = 10.0
# What a checkpoint's recipe meant before these fields existed (no clipping, no warm-up, He
# init, the last epoch kept), so that --resume of an older run continues it unchanged.
BEFORE_ISSUE_14 = {"clip_norm": 0.0, "warmup_steps": 0, "init": "kaiming", "select": "top1"}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; stored in the checkpoint as ``recipe``.

    ``batch_size``, ``epochs``, ``steps`` and ``warmup_steps`` may be left ``None``: the run
    fills them in from the size of the training set (``budget.resolve_budget``) and stores the
    values it used, so a resumed run continues with exactly them.
    """

    name: str = "onecycle"
    arch: str = "torchvision"
    batch_norm: bool = False
    groups: int = 1
    image_size: int = 224
    epochs: int | None = None  # None: from ``steps``; the paper ran "roughly 90 cycles"
    steps: int | None = None  # optimizer steps in total (None: the budget rule's)
    batch_size: int | None = None  # None: chosen so a small folder still gets enough steps
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    plateau_patience: int = 2
    warmup_steps: int | None = None  # linear warm-up of the paper recipe (onecycle has its own)
    # Gradient norm clipping: a few bad early batches cannot throw the weights far (a tiny
    # generated set went 2.39 -> 14.98 in its third epoch without it). 0 turns it off.
    clip_norm: float = CLIP_NORM
    select: str = "map"  # keep the epoch with the best fc7 retrieval mAP ("top1": accuracy)
    # "kaiming": He et al. (2015); "paper": section 5's N(0, 0.01) with unit biases; "default":
    # torchvision's. Measured on Fashion-MNIST at 64 px, lr 0.01, 80 steps of 128: the paper's
    # init spikes then sits dead at ln(10) = 2.303, torchvision's is still at 2.299, He's at 1.87.
    # "lsuv": He's, then each layer scaled to unit output on training images (``scale_to_unit``).
    init: str = "lsuv"
    augmentation: Augmentation = field(default_factory=Augmentation)
    # "imagenet" (torchvision's weights) or a checkpoint's absolute path: start from it with a
    # new last layer (training/start.py)
    finetune: str | None = None
    freeze: str | None = None  # "features": train only the classifier
    val_fraction: float | None = None  # hold out this share of train (else val/, test/, t10k)
    subset: int | None = None  # train on this many images (stratified), for quick runs
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """A stored recipe; one from before a field existed gets what it was trained with."""
        known = {**BEFORE_ISSUE_14, "name": "paper"} if "select" not in data else {}
        known.update({k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        known["augmentation"] = Augmentation(**known.get("augmentation", {}))
        return cls(**known)

    def model_args(self, n_classes: int, channels: int) -> ModelArgs:
        return ModelArgs(self.arch, channels, n_classes, self.dropout, self.batch_norm, self.groups)


def make_recipe(name: str = "onecycle", **overrides: Any) -> Recipe:
    """A named recipe with the given fields changed (``None`` values keep the recipe's)."""
    if name not in RECIPES:
        raise RetrieveError(f"unknown recipe {name!r}; expected one of {RECIPES}")
    base = Recipe(name=name)
    if overrides.get("finetune") and overrides.get("lr") is None:
        base = replace(base, lr=base.lr / 10)  # pretrained weights want smaller steps
    recipe = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if recipe.arch not in ARCHITECTURES:
        raise RetrieveError(f"unknown architecture {recipe.arch!r}; expected {ARCHITECTURES}")
    smallest = MIN_IMAGE_SIZES[recipe.arch]
    if recipe.image_size < smallest:
        raise RetrieveError(
            f"image size {recipe.image_size} is below the {recipe.arch} AlexNet's {smallest}"
        )
    if recipe.groups not in GROUPS:
        raise RetrieveError(f"--groups {recipe.groups}: expected one of {GROUPS}")
    if recipe.select not in SELECT:
        raise RetrieveError(f"--select {recipe.select}: expected one of {SELECT}")
    if recipe.epochs is not None and recipe.steps is not None:
        raise RetrieveError("give --epochs or --steps, not both")
    if recipe.finetune not in (None, "imagenet"):
        path = Path(recipe.finetune)
        if not path.is_file():
            raise WeightsError(f"--finetune {recipe.finetune}: expected imagenet or a weights file")
        recipe = replace(recipe, finetune=os.path.abspath(path))  # a resumed run finds it
    plain = recipe.arch == "torchvision" and not recipe.batch_norm and recipe.groups == 1
    if recipe.finetune == "imagenet" and not plain:
        raise RetrieveError(
            "--finetune imagenet needs --arch torchvision without --batch-norm or --groups "
            "(the weights' layout)"
        )
    if recipe.freeze not in (None, "features"):
        raise RetrieveError(f"--freeze {recipe.freeze}: only 'features' is supported")
    return recipe


def init_kaiming(model: AlexNet) -> None:
    """He et al. (2015) normal init, zero biases, a small last layer.

    Without batch norm, torchvision's default init (and the paper's N(0, 0.01)) shrinks the signal
    layer by layer, so the loss sits at ln(classes) for hundreds of steps; He init keeps the
    activations' scale and learns from the first epoch (with a warm-up, which OneCycle has)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    torch.nn.init.normal_(model.classifier[-1].weight, 0.0, 0.01)


@torch.no_grad()
def scale_to_unit(model: AlexNet, x: torch.Tensor) -> None:
    """Scale each conv and hidden FC layer so its output has unit RMS on ``x`` (LSUV's scaling
    step: Mishkin and Matas, "All you need is a good init", 2016).

    He init keeps each layer's own scale, but the three overlapping max-pools pick the largest
    of 9 values each time: fc7 comes out ~6x too large, the last layer's gradient is ~80x its
    weights' norm, and the first steps throw the logits far (a tiny set's loss jumped from 1.2
    to 12 in the third step). Unit outputs keep fc7 near 1 and the early steps sane."""
    was_training = model.training
    model.eval()  # no dropout, batch norm on its initial statistics
    for _, layer in [*model.conv_layers(), *model.fc_layers()[:2]]:
        rms = float(_output_of(model, layer, x).float().pow(2).mean().sqrt())
        if rms > 0:
            layer.weight.div_(rms)
            if layer.bias is not None:
                layer.bias.div_(rms)
    model.train(was_training)


def _output_of(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0]


def warmup_factor(recipe: Recipe, global_step: int) -> float:
    """The paper recipe's linear warm-up: lr * (step + 1) / warmup_steps for the first steps."""
    warmup = recipe.warmup_steps or 0
    return 1.0 if global_step >= warmup else (global_step + 1) / warmup


def build_model(
    recipe: Recipe,
    n_classes: int,
    channels: int,
    *,
    pretrained: bool = True,
    start: StartingPoint | None = None,
) -> AlexNet:
    """The network a recipe starts from (``pretrained=False`` skips loading the fine-tuning
    start, for a resumed run that overwrites it anyway; ``start``: one already loaded)."""
    args = recipe.model_args(n_classes, channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # the same seed gives the same initial weights
        model = AlexNet(args)
        if recipe.init == "paper" and not recipe.finetune:
            init_as_paper(model)
        elif recipe.init in ("kaiming", "lsuv") and not recipe.finetune:
            init_kaiming(model)
    if recipe.finetune and pretrained:
        load_into(model, start or load_start(recipe.finetune), channels)  # new classes, new head
    if recipe.freeze == "features":
        model.features.requires_grad_(False)
    return model


def make_scheduler(
    recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int, start_step: int = 0
) -> Any:
    """The recipe's schedule; ``start_step`` > 0 draws a one-cycle schedule for the recipe's
    (new) length from that step on, for a run whose end moved."""
    if recipe.name == "onecycle":
        # OneCycleLR divides by zero when a phase has no steps: tiny runs get at least 4 steps.
        total = max((recipe.epochs or 1) * steps_per_epoch, 4)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=recipe.lr,
            total_steps=total,
            pct_start=max(0.25, 1.5 / total),
            base_momentum=0.85,
            max_momentum=recipe.momentum,
            last_epoch=start_step - 1,
        )
    # Paper section 5: divide by 10 when the validation error stops improving.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=recipe.plateau_patience
    )
