"""What the network learnt, as pictures: the conv1 kernels (the paper's Figure 3) and the feature
maps of any layer for one image. PNG through Pillow; no plotting library needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from retrieval.atomic import atomic_path
from retrieval.devices import resolve_device
from retrieval.errors import RetrieveError
from retrieval.images.decode import load_image
from retrieval.model.weights import load_model

# The paper's names for torchvision's module indices (outputs after the ReLU, or LRN in the
# paper variant, where both sit in the same slot).
LAYERS = {
    "conv1": "features.1",
    "pool1": "features.2",
    "conv2": "features.4",
    "pool2": "features.5",
    "conv3": "features.7",
    "conv4": "features.9",
    "conv5": "features.11",
    "pool5": "features.12",
}
TARGET_WIDTH = 1000  # pixels the default scale aims for


def _save_png(grid: torch.Tensor, output: Path, scale: int) -> Path:
    """A float ``3 x H x W`` grid in [0, 1], enlarged ``scale`` times without smoothing."""
    pixels = grid.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(pixels, "RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    output = Path(output)
    with atomic_path(output) as tmp:
        image.save(tmp, format="PNG")
    return output


def _default_scale(grid_width: int) -> int:
    return max(1, TARGET_WIDTH // max(grid_width, 1))


def kernel_grid(weight: torch.Tensor, per_row: int | None = None) -> torch.Tensor:
    """conv1 weights ``K x C x h x w`` as one image, each kernel stretched to its own [0, 1]."""
    per_row = per_row or (16 if weight.shape[0] >= 64 else 8)
    return make_grid(
        weight.detach().float().cpu(),
        nrow=per_row,
        padding=1,
        normalize=True,
        scale_each=True,
        pad_value=1.0,
    )


def draw_kernels(
    weights: str | Path, output: str | Path, *, scale: int | None = None, device: str = "cpu"
) -> Path:
    """The first layer's kernels as coloured patches (paper Figure 3) in a PNG."""
    loaded = load_model(weights, resolve_device(device))
    grid = kernel_grid(loaded.model.features[0].weight)
    return _save_png(grid, Path(output), scale or _default_scale(grid.shape[-1]))


def layer_output(model: torch.nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of ``layer`` (a paper name such as ``conv2``, or a module name) for ``x``."""
    name = LAYERS.get(layer, layer)
    modules = dict(model.named_modules())
    if name not in modules or not name:
        choices = ", ".join(LAYERS)
        raise RetrieveError(f"unknown layer {layer!r}; use {choices} or a module name")
    captured: list[torch.Tensor] = []
    handle = modules[name].register_forward_hook(lambda _m, _i, out: captured.append(out.clone()))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    return captured[0]


def feature_map_grid(maps: torch.Tensor) -> torch.Tensor:
    """``C x h x w`` activations as a grid of grey tiles, each scaled by its own maximum."""
    maps = maps.detach().float().cpu()
    if maps.ndim == 1:  # a fully-connected layer: one row of values
        maps = maps.view(1, 1, -1)
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    tiles = ((maps - low) / (high - low).clamp_min(1e-8)).unsqueeze(1)
    return make_grid(tiles, nrow=math.ceil(math.sqrt(len(tiles))), padding=1, pad_value=1.0)


def draw_feature_maps(
    weights: str | Path,
    image: str | Path,
    output: str | Path,
    *,
    layer: str = "conv1",
    scale: int | None = None,
    device: str = "cpu",
) -> Path:
    """The activations of ``layer`` for ``image``, one tile per channel, in a PNG."""
    torch_device = resolve_device(device)
    loaded = load_model(weights, torch_device)
    pil = load_image(Path(image), mode=loaded.preprocessing.mode)
    x = loaded.preprocessing(pil).unsqueeze(0).to(torch_device)
    grid = feature_map_grid(layer_output(loaded.model, x, layer)[0])
    return _save_png(grid, Path(output), scale or _default_scale(grid.shape[-1]))
