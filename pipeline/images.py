"""Pictures of a model as PNG (Pillow, no plotting library): prior samples, reconstructions beside
their inputs, latent traversals, and for 2-D data a scatter of data vs model samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline import vae_math
from pipeline.outputs import atomic_write


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
    image = Image.fromarray(arr[..., 0] if c == 1 else arr)
    return atomic_write(path, lambda f: image.save(f, format="PNG"), "image")


def side_by_side(inputs: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """Interleave inputs and reconstructions: columns pair each input with its reconstruction."""
    return torch.stack([inputs.float(), recons.float()], dim=1).flatten(0, 1)


def scatter(data: np.ndarray, samples: np.ndarray, path: str | Path, size: int = 320) -> Path:
    """2-D points: data in blue, model samples in orange, on axes that hold the data's 1-99% range."""
    lo = np.percentile(data, 1, axis=0)
    hi = np.percentile(data, 99, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - 0.15 * span, hi + 0.15 * span
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def to_px(p):
        u = (p - lo) / (hi - lo)
        return u[:, 0] * (size - 1), (1 - u[:, 1]) * (size - 1)

    for points, color in ((data, (31, 119, 180)), (samples, (255, 127, 14))):
        xs, ys = to_px(np.asarray(points, dtype=np.float64))
        for x, y in zip(xs, ys):
            if 0 <= x < size and 0 <= y < size:
                draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=color)
    draw.text((4, 4), "data", fill=(31, 119, 180))
    draw.text((4, 16), "samples", fill=(255, 127, 14))
    return atomic_write(path, lambda f: img.save(f, format="PNG"), "image")


def traversal(vae, example: torch.Tensor, kl_per_dim: torch.Tensor, steps: int = 9, span: float = 3.0,
              max_dims: int = 10) -> torch.Tensor:
    """One row per latent dimension (the most informative first, by mean KL): the decoded mean of
    the example's code with that dimension swept over [-span, span] and the others held."""
    mu, _ = vae.encode(example[None])
    dims = torch.argsort(kl_per_dim, descending=True)[:max_dims]
    values = torch.linspace(-span, span, steps, device=mu.device)
    z = mu.repeat(len(dims), steps, 1)  # [dims, steps, d]
    for row, d in enumerate(dims.tolist()):
        z[row, :, d] = values
    return vae.mean(z.flatten(0, 1))


@torch.no_grad()
def write_model_grids(vae, fixed_z: torch.Tensor, examples: torch.Tensor | None, out_dir: str | Path,
                      tag: str, seed: int = 0) -> dict[str, Path]:
    """{'samples': samples_<tag>.png from the fixed prior draws, 'recon': input | reconstruction
    pairs, 'traversal': latent traversals}; for 2-D data {'scatter': data vs samples}."""
    out_dir = Path(out_dir)
    if tuple(vae.input_shape) == (2,) and examples is not None:
        gen = torch.Generator(device=fixed_z.device).manual_seed(seed)  # the same draws every time
        z = torch.randn(len(examples), fixed_z.shape[-1], generator=gen, device=fixed_z.device)
        mean = vae.mean(z)
        if vae.likelihood == "gaussian":
            sigma = (0.5 * vae.log_sigma2).exp()
            mean = mean + sigma * torch.randn(mean.shape, generator=gen, device=mean.device)
        return {"scatter": scatter(examples.float().cpu().numpy(), mean.cpu().numpy(), out_dir / f"scatter_{tag}.png")}
    if not is_image_shape(vae.input_shape):
        return {}
    paths = {"samples": save_grid(vae.mean(fixed_z), out_dir / f"samples_{tag}.png", nrow=8)}
    if examples is not None:
        mu, logvar = vae.encode(examples)
        paths["recon"] = save_grid(side_by_side(examples, vae.mean(mu)), out_dir / f"recon_{tag}.png", nrow=8)
        kl = vae_math.kl_standard_normal(mu.unsqueeze(-1), logvar.unsqueeze(-1)).mean(0)  # per dimension
        paths["traversal"] = save_grid(traversal(vae, examples[0], kl), out_dir / f"traversal_{tag}.png", nrow=9)
    return paths
