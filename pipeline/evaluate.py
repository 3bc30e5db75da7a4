"""`vaepipe eval` (ELBO, IWAE bound, importance-sampled log p(x)) and `vaepipe sample` (image grids)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import vae_math
from pipeline.checkpoints import load_checkpoint
from pipeline.errors import ShardError, UnsafeCheckpointError
from pipeline.data.location import data_root_for, load_manifest
from pipeline.data.stream import make_subset_loader
from pipeline.images import is_image_shape, save_grid, side_by_side


def fmt_duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def load_module(ckpt: str | Path):
    """The trained module from a checkpoint, on CPU, in eval mode; clear errors for bad paths/files."""
    ckpt = Path(ckpt)
    if ckpt.is_dir():  # a run folder: take its last checkpoint
        ckpt = ckpt / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    from pipeline.train import module_class

    try:
        # One safe read (pipeline/checkpoints.py); the module is rebuilt from the stored config and
        # given the stored weights, as Lightning's load_from_checkpoint would, without a second read.
        checkpoint = load_checkpoint(ckpt)
        hparams = checkpoint["hyper_parameters"]
        cls = module_class(hparams["config"]["model"].get("family", "vae"))
        # The stored config sizes the networks (widths, mixtures, ...): built first on the meta
        # device (no memory), it must describe exactly the stored weights, so a crafted config
        # cannot make this process allocate more than the file itself holds.
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in cls(**hparams).state_dict().items()}
        stored = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
        if shapes != stored:
            wrong = sorted(set(shapes) ^ set(stored)) or [k for k in shapes if shapes[k] != stored[k]]
            raise ValueError(f"{ckpt}: its config does not describe its weights (first difference: {wrong[0]}): "
                             "a damaged or edited checkpoint")
        module = cls(**hparams)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
    except UnsafeCheckpointError:
        raise
    except (RuntimeError, KeyError) as err:  # a damaged file is already named by load_checkpoint
        raise ValueError(f"{ckpt} is not a readable vaepipe checkpoint (truncated or foreign?): {err}") from None
    return module.eval()


def check_data_fits(module, root: str, split: str, manifest: dict | None = None) -> dict:
    """The split's manifest, after checking that its samples have the model's shape: another data
    set's folder (--data-root) would otherwise fail deep inside the network with a matmul error."""
    manifest = manifest or load_manifest(root)
    if split not in manifest["splits"]:
        raise ValueError(f"data root '{root}' has no split '{split}'")
    have, want = list(manifest["splits"][split]["shape"]), list(module.hparams["sample_shape"])
    if have != want:
        raise ValueError(f"data root '{root}' holds '{manifest.get('name')}' samples of shape {have}; the model was "
                         f"trained on {module.cfg.data.name!r} samples of shape {want}: point --data-root at its data")
    return manifest


def pick_device(device: str | None) -> torch.device:
    """--device (default: cuda when available), or a one-line error for a name or GPU not here."""
    try:
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: no such CUDA GPU here ({torch.cuda.device_count()} visible)")
    return chosen


MIN_FACTOR_EXAMPLES = 200  # below this the disentanglement metrics are noise: not reported


# Compiling takes 5-20 s and saves ~4 us per importance sample on a 2-core CPU: worth it from a few
# million samples (the 10k MNIST test set at K = 5000 is 50 million).
COMPILE_SAMPLES = 5_000_000


def default_chunk(batch_size: int, device: torch.device, row_numel: int = 784) -> int:
    """Samples per pass: on CPU ~5000 decoder rows (chunk x batch), whose [rows, pixels] logits stay
    in cache through the likelihood's passes (50 000 rows ran 1.5x slower here: every elementwise
    pass went to memory); on a GPU 500 samples, large passes keeping the device busy. Fewer when a
    row is large (`row_numel`, the likelihood's parameters per sample: 102 400 for CIFAR-10's
    mixture): a pass then stays within 50 M numbers on CPU (200 MB a tensor), 800 M on a GPU."""
    if device.type == "cuda":
        return min(500, max(1, 800_000_000 // (max(1, row_numel) * batch_size)))
    return max(1, min(5000, 50_000_000 // max(1, row_numel)) // batch_size)


def decoder_numel(vae) -> int:
    """Decoder outputs per sample: the likelihood's parameters (pixels for Bernoulli/Gaussian)."""
    return math.prod(vae.pixel.param_shape)


def log_weight_kernel(vae, compile: bool):
    """(x, z, mu, logvar) -> log w = log p(x|z) + log p(z) - log q(z|x), [n, B]. Compiled, the
    decoder's bias + tanh and the likelihood's softplus, product and sums fuse into the matrix
    products' passes: evaluation then runs near this machine's GEMM rate (bench/eval_vs_gemm.py).
    Compiling takes 5-20 s once; without a C++ compiler it falls back to eager, saying so."""

    def log_w(x, z, mu, logvar):
        return vae_math.log_importance_weights(vae.log_px_given_z(x, z), z, mu, logvar)

    if not compile:
        return log_w
    fn = torch.compile(log_w, dynamic=False)

    def guarded(*args):
        nonlocal fn
        try:
            return fn(*args)
        except Exception as err:  # inductor needs a working C++ toolchain; eager is always right
            if fn is log_w:
                raise
            print(f"note: torch.compile unavailable ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                  "evaluating eagerly (--no-compile skips the attempt)", file=sys.stderr)
            fn = log_w
            return log_w(*args)

    return guarded


@torch.no_grad()
def importance_rate(vae, x: torch.Tensor, seconds: float = 0.25) -> float:
    """Importance samples per second `vaepipe eval` gets for this model on this machine (eager, its
    default chunk), measured on `x` for about `seconds` after one warm-up pass."""
    chunk, kernel = default_chunk(len(x), x.device, decoder_numel(vae)), log_weight_kernel(vae, False)
    mu, logvar = vae.encode(x)
    gen = torch.Generator(device=x.device).manual_seed(0)
    done, t0 = 0, None
    while t0 is None or time.perf_counter() - t0 < seconds:
        if vae.stochastic_layers == 2:
            lw = vae.log_weights(x, chunk, gen)
        else:
            lw = kernel(x, vae_math.reparameterize(mu, logvar, chunk, gen), mu, logvar)
        float(lw.sum())  # waits for a GPU
        if t0 is None:
            t0 = time.perf_counter()  # the first pass warms up
        else:
            done += chunk * len(x)
    return done / (time.perf_counter() - t0)


def eval_suggestion(ckpt, module, splits: dict, x: torch.Tensor | None, budget_s: float = 600) -> str:
    """The `vaepipe eval` a user can run next on this machine: the largest K of 5000 (the papers'
    figure), 1000, 100, 10 that takes at most `budget_s` at the measured rate, with its time. On the
    test split, or on val for a set without one (shards indexed without test shards)."""
    split = "test" if splits["test"]["num_samples"] else "val"
    examples, flag = splits[split]["num_samples"], "" if split == "test" else " --split val"
    if module.cfg.model.family == "vqvae" or x is None or examples == 0:
        return f"vaepipe eval {ckpt}{flag}"
    was = module.training
    module.eval()
    try:  # Lightning moved the weights to the CPU after fit; the examples may still be on the GPU
        rate = importance_rate(module.vae, x[:100].to(next(module.vae.parameters()).device))
    except Exception as err:  # noqa: BLE001 - a hint must never fail a finished run
        return f"vaepipe eval {ckpt}{flag} --k 100   (time not measured: {type(err).__name__})"
    finally:
        module.train(was)
    k_train = int(module.cfg.model.k)
    seconds = {k: examples * (k + k_train) / rate for k in (5000, 1000, 100, 10)}
    k = next((k for k in seconds if seconds[k] <= budget_s), 10)
    text = f"vaepipe eval {ckpt}{flag} --k {k}   (~{fmt_duration(seconds[k])} here for {examples} {split} examples"
    return text + (f"; --k 5000, the papers' figure: ~{fmt_duration(seconds[5000])})" if k != 5000 else ")")


@torch.no_grad()
def evaluate(ckpt: str | Path, k: int = 5000, split: str = "test", limit: int | None = None,
             batch_size: int = 100, chunk: int | None = None, data_root: str | None = None, seed: int = 0,
             progress: bool = True, device: str | None = None, compile: bool | None = None, shards: str | None = None) -> dict:
    """Per-example means over a split (nats): ELBO, L_k at the model's training K, and L_K with
    K = `k`, the importance-sampled estimate of log p(x) (Choice 2, Concepts 11.6-11.9).

    The ELBO is the mean log-weight of the same K samples (an unbiased ELBO estimate), so one pass
    over the decoder gives both. Dynamic binarisation of the inputs is drawn once from `seed`.
    `chunk`: samples per pass (default_chunk); `compile`: torch.compile the log-weights (default:
    when examples x K >= COMPILE_SAMPLES, where the one-off compile time is small beside the
    evaluation)."""
    device = pick_device(device)
    module = load_module(ckpt).to(device)
    cfg, vae = module.cfg, module.vae
    root = data_root = data_root_for(cfg.data.root, data_root)  # never a command/URL from the checkpoint
    manifest = check_data_fits(module, root, split, load_manifest(root, shards))
    from pipeline.models.components.likelihoods import check_pixel_data  # noqa: PLC0415

    check_pixel_data(vae, manifest, f"data root '{root}'", cfg.data.binarize)
    if cfg.model.family == "vqvae":
        return evaluate_vq(module, ckpt, split, limit, batch_size, data_root, seed, progress, device, manifest)
    chunk = chunk or default_chunk(batch_size, device, decoder_numel(vae))
    examples = manifest["splits"][split]["num_samples"]
    examples = min(examples, limit) if limit else examples
    if compile is None:
        compile = examples * k >= COMPILE_SAMPLES
    compile = compile and vae.stochastic_layers == 1  # two layers: ancestral sampling, eager (draw below)
    kernel = log_weight_kernel(vae, compile)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    loader = make_subset_loader(root, split, batch_size, binarize=cfg.data.binarize, limit=limit, seed=seed,
                                manifest=manifest)
    k_train = int(cfg.model.k)
    sums = {"elbo": 0.0, "log_px": 0.0, "log_px_sq": 0.0, f"iwae{k_train}": 0.0}
    n, t0 = 0, time.time()
    codes, factors = [], []  # encoder means and ground-truth factors, for the disentanglement metrics
    # Progress in importance samples, advanced after every chunk (~5000 decoder rows on CPU: a few ms),
    # not per batch: at K = 5000 one batch of 100 images is 500 000 samples, minutes on a CPU.
    total = examples * (k + k_train)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"eval {split}: {examples} examples x (K={k} + {k_train} for L_{k_train}) = {total / 1e6:.1f} M importance "
        f"samples on {device}{', compiled' if compile else ''}")
    bar = tqdm(total=total, desc=f"eval {split} K={k}", unit="sample", unit_scale=True, disable=not progress,
               file=sys.stderr, mininterval=1.0, smoothing=0.1)
    timing = {"done": 0, "start": None, "said": False}

    def advance(m: int, batch_size_now: int) -> None:
        bar.update(m * batch_size_now)
        timing["done"] += m * batch_size_now
        if timing["start"] is None:  # the first chunk pays compilation and warm-up: time from the second
            timing["start"], timing["first"] = time.time(), timing["done"]
        elif not timing["said"] and time.time() - timing["start"] > 2.0:
            rate = (timing["done"] - timing["first"]) / (time.time() - timing["start"])
            say(f"estimated time: {fmt_duration((total - timing['done']) / rate)} more at {rate / 1e3:.0f}k "
                "samples/s (the bar below keeps an ETA)")
            timing["said"] = True

    for batch in loader:
        x = batch["x"].to(device, non_blocking=True)
        mu, logvar = vae.encode(x)
        if "factors" in batch:
            codes.append(mu.float().cpu())
            factors.append(batch["factors"])
        log_w_sum = torch.zeros(x.shape[0], device=device)

        def draw(m):
            if vae.stochastic_layers == 2:  # ancestral samples through q(z1|x) q(z2|z1)
                return vae.log_weights(x, m, gen)
            z = vae_math.reparameterize(mu, logvar, m, gen)
            return kernel(x, z, mu, logvar)

        def log_w(m):
            nonlocal log_w_sum
            lw = draw(m)
            log_w_sum += lw.sum(0)
            advance(m, x.shape[0])
            return lw

        log_px = vae_math.log_mean_exp_chunked(log_w, k, chunk)
        bound = vae_math.iwae_bound(draw(k_train))
        advance(k_train, x.shape[0])
        sums["elbo"] += float((log_w_sum / k).sum())
        sums["log_px"] += float(log_px.sum())
        sums["log_px_sq"] += float(log_px.pow(2).sum())
        sums[f"iwae{k_train}"] += float(bound.sum())
        n += x.shape[0]
    bar.close()
    if n == 0:
        raise ValueError(f"split '{split}' of {data_root or cfg.data.root} has no examples")
    mean_log_px = sums["log_px"] / n
    std = math.sqrt(max(sums["log_px_sq"] / n - mean_log_px**2, 0.0))
    extra = {}
    if factors and n >= MIN_FACTOR_EXAMPLES:  # data with ground-truth factors (sprites): Concept 11.25's metrics
        from pipeline.disentanglement import beta_vae_score, mig

        z, v = torch.cat(codes).numpy(), torch.cat(factors).numpy()
        extra = {"mig": mig(z, v), "beta_vae_score": beta_vae_score(z, v, seed=seed)}
    return {
        **extra,
        "checkpoint": str(ckpt), "split": split, "examples": n, "k": k,
        "chunk": chunk, "compiled": compile, "elbo": sums["elbo"] / n, f"iwae_bound_k{k_train}": sums[f"iwae{k_train}"] / n,
        f"iwae_bound_k{k}": mean_log_px, "nll": -mean_log_px, "nll_stderr": std / math.sqrt(n),
        **bits_per_dim(vae, mean_log_px, std / math.sqrt(n), sums["elbo"] / n),
        "seconds": time.time() - t0, "device": str(device),
    }


def bits_per_dim(vae, log_px: float, stderr: float, elbo: float) -> dict:
    """bpd = -log p(x) / (D ln 2) (and its standard error, and the ELBO's) for a likelihood of 8-bit
    values; for a density (Gaussian) or Bernoulli pixels a note instead of a figure that would look
    comparable with the literature's and is not (docs/images.md)."""
    factor = vae.bits_per_dim
    if not factor:
        return {"bpd": None, "bpd_note": f"not reported: model.likelihood={vae.likelihood} is not a probability of "
                                          "8-bit pixel values (docs/images.md, bits per dimension)"}
    return {"bpd": -log_px * factor, "bpd_stderr": stderr * factor, "bpd_elbo": -elbo * factor,
            "dims": math.prod(vae.input_shape)}


@torch.no_grad()
def evaluate_vq(module, ckpt, split, limit, batch_size, data_root, seed, progress, device, manifest=None) -> dict:
    """VQ-VAE: reconstruction NLL -log p(x|z_q), and with a uniform prior over the codes (what this
    model has without a learned prior) the ELBO log p(x|z_q) - h*w*log K (q is deterministic,
    so the KL to the uniform prior is log K per latent position); code usage."""
    cfg, vq = module.cfg, module.vae
    loader = make_subset_loader(data_root or cfg.data.root, split, batch_size, binarize=cfg.data.binarize,
                                limit=limit, seed=seed, manifest=manifest)
    torch.manual_seed(seed)
    recon, n, t0 = 0.0, 0, time.time()
    counts = torch.zeros(cfg.model.codebook_size, device=device)
    for batch in tqdm(loader, desc=f"eval {split}", disable=not progress, file=sys.stderr):
        x = batch["x"].to(device)
        _, z_q, codes = vq.quantizer(vq.encode(x))
        recon += float(vq.log_px_given_zq(x, z_q).sum())
        counts += torch.bincount(codes.flatten(), minlength=cfg.model.codebook_size).float()
        n += x.shape[0]
    if n == 0:
        raise ValueError(f"split '{split}' of {data_root or cfg.data.root} has no examples")
    h, w = vq.grid
    kl = h * w * math.log(cfg.model.codebook_size)
    return {"checkpoint": str(ckpt), "split": split, "examples": n, "k": 0, "nll_recon": -recon / n,
            "elbo_uniform_prior": recon / n - kl, "perplexity": float(vae_math.codebook_perplexity(counts)),
            "dead_codes": int((counts == 0).sum()), "seconds": time.time() - t0, "device": str(device)}


@torch.no_grad()
def sample(ckpt: str | Path, out: str | Path, n: int = 64, seed: int = 0, split: str = "test",
           data_root: str | None = None, pixels: str = "mean") -> list[Path]:
    """`out`: n prior samples z ~ p(z) shown as the mean of p(x|z) (pixels="mean") or as a draw
    x ~ p(x|z) ("draw"); `<stem>_recon<suffix>`: inputs (up to 32, drawn at random from the split: a
    split stored in label order would show one digit) beside reconstructions (the same choice).
    Data that are not images (2-D points) are written as .npy arrays instead."""
    module = load_module(ckpt)
    vae, cfg = module.vae, module.cfg
    out = Path(out)
    try:
        root = data_root_for(cfg.data.root, data_root)  # never a command/URL from the checkpoint
    except ShardError as err:
        root = None
        print(f"no reconstructions: {err}", file=sys.stderr)
    if root and (Path(root) / "manifest.json").is_file():  # reconstructions need fitting data
        check_data_fits(module, root, split)
    if cfg.model.family == "vqvae":  # uniform code grids, and reconstructions as in training
        if pixels != "mean":
            raise ValueError("--pixels draw: a VQ-VAE's pictures are its decoder's means (--pixels mean)")
        codes = torch.randint(0, cfg.model.codebook_size, (n, *vae.grid), generator=torch.Generator().manual_seed(seed))
        samples, reconstruct = vae.codes_to_images(codes), vae.reconstruct
    else:
        gen = torch.Generator().manual_seed(seed)
        show = vae.mean if pixels == "mean" else lambda z: vae.draw(z, gen)  # noqa: E731
        samples = show(torch.randn(n, vae.latent_dim, generator=gen))
        reconstruct = lambda x: show(vae.encode(x)[0])  # noqa: E731 - the encoder's mean, decoded
        if not is_image_shape(vae.input_shape):
            path = out.with_suffix(".npy")
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, samples.numpy())
            return [path]
    paths = [save_grid(samples, out, nrow=8)]
    if root is None:
        return paths
    try:
        x = next(iter(make_subset_loader(root, split, min(n, 32), limit=min(n, 32), seed=seed,
                                         binarize=cfg.data.binarize)))["x"]
    except FileNotFoundError as err:
        print(f"no reconstructions: {err}", file=sys.stderr)
        return paths
    paths.append(save_grid(side_by_side(x, reconstruct(x)), out.with_name(f"{out.stem}_recon{out.suffix}"), nrow=8))
    return paths
