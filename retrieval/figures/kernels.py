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
from retrieval.model.weights import LoadedModel, load_model

# The paper's names for layer outputs (after the ReLU, or LRN in the paper variant, where both sit
# in the same slot); each model's own ``layers`` gives their module names, batch norm or not.
LAYERS = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7")
GROUP_GAP = 4  # white pixels between the two groups' blocks (Figure 3's two GPUs)
TARGET_WIDTH = 1000  # pixels the default scale aims for


def _loaded(model: str | Path | LoadedModel, device: str) -> tuple[LoadedModel, torch.device]:
    """``model`` as given (an index's, already checked), or loaded from its weights spec."""
    if isinstance(model, LoadedModel):
        return model, next(model.model.parameters()).device
    torch_device = resolve_device(device)
    return load_model(model, torch_device), torch_device


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


def grouped_kernel_grid(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """conv1's kernels, one block per group stacked top to bottom, as the paper's Figure 3 shows
    the 48 kernels of GPU 1 above the 48 of GPU 2 (conv2 sees only its own GPU's half)."""
    if groups <= 1:
        return kernel_grid(weight)
    per_group = weight.shape[0] // groups
    per_row = 16 if per_group >= 32 else 8  # 48 per group: three rows of 16, as in Figure 3
    blocks = [kernel_grid(part, per_row) for part in weight.split(per_group)]
    gap = torch.ones(blocks[0].shape[0], GROUP_GAP, blocks[0].shape[-1])
    parts = [blocks[0]]
    for block in blocks[1:]:
        parts += [gap, block]
    return torch.cat(parts, dim=1)


def draw_kernels(
    model: str | Path | LoadedModel,
    output: str | Path,
    *,
    scale: int | None = None,
    device: str = "cpu",
) -> Path:
    """The first layer's kernels as coloured patches (paper Figure 3) in a PNG; a two-group
    network's two halves as two blocks. ``model``: a weights spec or a loaded model."""
    loaded, _ = _loaded(model, device)
    conv1 = loaded.model.conv_layers()[0][1]
    grid = grouped_kernel_grid(conv1.weight, loaded.args.groups)
    return _save_png(grid, Path(output), scale or _default_scale(grid.shape[-1]))


def layer_output(model: torch.nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of ``layer`` (a paper name such as ``conv2``, or a module name) for ``x``."""
    name = getattr(model, "layers", {}).get(layer, layer)
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
    model: str | Path | LoadedModel,
    image: str | Path,
    output: str | Path,
    *,
    layer: str = "conv1",
    scale: int | None = None,
    device: str = "cpu",
) -> Path:
    """The activations of ``layer`` for ``image``, one tile per channel, in a PNG."""
    loaded, torch_device = _loaded(model, device)
    pil = load_image(Path(image), mode=loaded.preprocessing.mode)
    x = loaded.preprocessing(pil).unsqueeze(0).to(torch_device)
    grid = feature_map_grid(layer_output(loaded.model, x, layer)[0])
    return _save_png(grid, Path(output), scale or _default_scale(grid.shape[-1]))
