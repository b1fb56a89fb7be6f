"""Training recipes: the paper's (section 5), OneCycle for short budgets, and fine-tuning
torchvision's ImageNet weights; and the network and learning-rate schedule each one starts from.

A :class:`Recipe` holds everything that decides the trained weights (the seed included), so a
checkpoint that stores it says how it was made, and ``--resume`` continues with exactly it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from retrieval.errors import RetrieveError, WeightsError
from retrieval.model.alexnet import MIN_IMAGE_SIZE, AlexNet, ModelArgs, init_as_paper
from retrieval.model.weights import load_model
from retrieval.training.augment import Augmentation

RECIPES = ("paper", "onecycle")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; stored in the checkpoint as ``recipe``."""

    name: str = "paper"
    arch: str = "torchvision"
    image_size: int = 224
    epochs: int = 90  # paper section 5: "roughly 90 cycles through the training set"
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    plateau_patience: int = 2
    # "kaiming": He et al. (2015); "paper": section 5's N(0, 0.01) with unit biases; "default":
    # torchvision's. Measured on Fashion-MNIST at 64 px, lr 0.01, 80 steps of 128: the paper's
    # init spikes then sits dead at ln(10) = 2.303, torchvision's is still at 2.299, He's at 1.87.
    init: str = "kaiming"
    augmentation: Augmentation = field(default_factory=Augmentation)
    finetune: str | None = None  # "imagenet": start from torchvision's weights
    freeze: str | None = None  # "features": train only the classifier
    val_fraction: float | None = None  # hold out this share of train (else val/, test/, t10k)
    subset: int | None = None  # train on this many images (stratified), for quick runs
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["augmentation"] = Augmentation(**known.get("augmentation", {}))
        return cls(**known)


def make_recipe(name: str = "paper", **overrides: Any) -> Recipe:
    """A named recipe with the given fields changed (``None`` values keep the recipe's)."""
    if name not in RECIPES:
        raise RetrieveError(f"unknown recipe {name!r}; expected one of {RECIPES}")
    base = Recipe(name=name)
    if name == "onecycle":
        base = Recipe(name=name, epochs=16, lr=0.01)
    if overrides.get("finetune") and overrides.get("lr") is None:
        base = replace(base, lr=base.lr / 10)  # pretrained weights want smaller steps
    recipe = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if recipe.image_size < MIN_IMAGE_SIZE:
        raise RetrieveError(f"image size {recipe.image_size} is below AlexNet's {MIN_IMAGE_SIZE}")
    if recipe.finetune not in (None, "imagenet"):
        raise RetrieveError(f"--finetune {recipe.finetune}: only 'imagenet' is supported")
    if recipe.finetune and recipe.arch != "torchvision":
        raise RetrieveError("--finetune imagenet needs --arch torchvision (the weights' layout)")
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


def build_model(
    recipe: Recipe, n_classes: int, channels: int, *, pretrained: bool = True
) -> AlexNet:
    """The network a recipe starts from (``pretrained=False`` skips loading ImageNet weights,
    for a resumed run that overwrites them anyway)."""
    args = ModelArgs(recipe.arch, channels, n_classes, recipe.dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # the same seed gives the same initial weights
        model = AlexNet(args)
        if recipe.init == "paper" and not recipe.finetune:
            init_as_paper(model)
        elif recipe.init == "kaiming" and not recipe.finetune:
            init_kaiming(model)
    if recipe.finetune and pretrained:
        state = dict(load_model("imagenet").model.state_dict())
        del state["classifier.6.weight"], state["classifier.6.bias"]  # new classes, new head
        if channels == 1:  # grey input: conv1 sees the same value in R, G and B
            state["features.0.weight"] = state["features.0.weight"].sum(dim=1, keepdim=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"classifier.6.weight", "classifier.6.bias"}:
            raise WeightsError(f"ImageNet weights do not fit: {missing} {unexpected}")
    if recipe.freeze == "features":
        model.features.requires_grad_(False)
    return model


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    if recipe.name == "onecycle":
        # OneCycleLR divides by zero when a phase has no steps: tiny runs get at least 4 steps.
        total = max(recipe.epochs * steps_per_epoch, 4)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=recipe.lr,
            total_steps=total,
            pct_start=max(0.25, 1.5 / total),
            base_momentum=0.85,
            max_momentum=recipe.momentum,
        )
    # Paper section 5: divide by 10 when the validation error stops improving.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=recipe.plateau_patience
    )
