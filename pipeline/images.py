"""Image grids as PNG (Pillow): prior samples, reconstructions beside their inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def is_image_shape(shape: tuple[int, ...]) -> bool:
    """(H, W) or (C, H, W) with C in {1, 3}; 2-D points (GMM) and flat vectors are not pictures."""
    return len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Tile images [N, H, W] or [N, C, H, W] with values in [0, 1] into one PNG."""
    x = images.detach().float().cpu().clamp(0, 1)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
    return path


def side_by_side(inputs: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """Interleave inputs and reconstructions: columns pair each input with its reconstruction."""
    return torch.stack([inputs.float(), recons.float()], dim=1).flatten(0, 1)


@torch.no_grad()
def write_model_grids(vae, fixed_z: torch.Tensor, examples: torch.Tensor | None, out_dir: str | Path,
                      tag: str) -> list[Path]:
    """samples_<tag>.png from the fixed prior draws, recon_<tag>.png (input | reconstruction pairs)."""
    if not is_image_shape(vae.input_shape):
        return []
    out_dir = Path(out_dir)
    paths = [save_grid(vae.mean(fixed_z), out_dir / f"samples_{tag}.png", nrow=8)]
    if examples is not None:
        mu, _ = vae.encode(examples)
        paths.append(save_grid(side_by_side(examples, vae.mean(mu)), out_dir / f"recon_{tag}.png", nrow=8))
    return paths
