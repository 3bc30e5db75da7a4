"""The 8-bit pixel likelihoods (vae_math's discretised logistic / Gaussian / logistic mixture and
pipeline/models/components/likelihoods.py) against independent computations: normalisation over
the 256 values, brute-force bin probabilities in high precision, finite gradients at the edges,
float32 under bf16 autocast, and the likelihood classes' shapes, means and draws.

Conventions: data k/255 in [0, 1]; vae_math.to_symmetric gives the bin centres in [-1, 1]; bins
are 2/255 wide; the lowest bin is open below, the highest open above."""

import math

import pytest
import torch

from pipeline import vae_math as vm
from pipeline.models.components.likelihoods import build_likelihood

mpmath = pytest.importorskip("mpmath")  # the brute-force reference (float64 underflows 200 sigma out)

K = torch.arange(256)
X01 = K.float() / 255  # the 256 data values, as the pipeline stores them (float32 k/255)
XS = vm.to_symmetric(X01)  # the 256 bin centres in [-1, 1], float32
FUNCS = {"logistic": vm.discretized_logistic_log_prob, "gaussian": vm.discretized_gaussian_log_prob}
MEANS = [-3.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0]
LOG_SCALES = [-7.0, -5.0, -2.0, 0.0, 3.0, 7.0]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- independent references (mpmath, 40 significant digits) --------------------------------------

mpmath.mp.dps = 40
HALF = mpmath.mpf(1) / 255


def _cdf(kind, t):
    return 1 / (1 + mpmath.exp(-t)) if kind == "logistic" else mpmath.ncdf(t)


def _pdf(kind, t):
    return mpmath.exp(-t) / (1 + mpmath.exp(-t)) ** 2 if kind == "logistic" else mpmath.npdf(t)


def _edges(x, mean, log_scale):
    # x: the exact centre (2k - 255) / 255 of the 8-bit value k nearest the float32 x given.
    # The product's documented bound on the log-scale (PixelCNN++'s -7; above e^7 uniform) applies.
    log_scale = min(max(float(log_scale), vm.LOG_SCALE_MIN), vm.LOG_SCALE_MAX)
    x = mpmath.mpf(2 * round((float(x) + 1) * 127.5) - 255) / 255
    mean = mpmath.mpf(mean)
    s = mpmath.exp(mpmath.mpf(log_scale))
    return x, s, (x - mean + HALF) / s, (x - mean - HALF) / s


def ref_bin_log_prob(kind, x, mean, log_scale):
    """log P(bin of x) by subtracting CDFs at the bin's exact edges (2k - 255 -+ 1) / 255 in 40-digit
    arithmetic: the lowest bin is CDF(top edge), the highest 1 - CDF(bottom edge); above the mean the
    difference is taken of the upper tails (CDF(-l) - CDF(-u), the same number) so that 40 digits
    are not eaten by 1 - tiny."""
    x, s, u, l = _edges(x, mean, log_scale)
    if x < -1 + HALF:
        p = _cdf(kind, u)
    elif x > 1 - HALF:
        p = _cdf(kind, -l)
    elif l > 0:
        p = _cdf(kind, -l) - _cdf(kind, -u)
    else:
        p = _cdf(kind, u) - _cdf(kind, l)
    return mpmath.log(p)


def ref_bin_grad(kind, x, mean, log_scale):
    """(d/d mean, d/d log_scale) of log P(bin of x), analytically: with P = F(u) - F(l),
    u, l = (x -+ 1/255 - mean) / s, dP/dmean = -(f(u) - f(l)) / s and dP/dlog s = -(u f(u) - l f(l)),
    the open edge's terms dropped (f and t f(t) vanish at infinity)."""
    x, s, u, l = _edges(x, mean, log_scale)
    fu = 0 if x > 1 - HALF else _pdf(kind, u)
    fl = 0 if x < -1 + HALF else _pdf(kind, l)
    p = mpmath.exp(ref_bin_log_prob(kind, x, mean, log_scale))
    return float(-(fu - fl) / s / p), float(-(u * fu - l * fl) / p)


def ref_mixture_log_prob(x, params, mixtures):
    """One pixel: x [C] in [-1, 1], params [P] in split_mixture_params' layout (logits M, means M*C,
    log-scales M*C, raw coefficients M*C(C-1)/2 through tanh, pairs (1,0),(2,0),(2,1)).
    log sum_m softmax(logits)_m prod_c P(x_c | mean_mc + sum_{j<c} c_mcj x_j, s_mc)."""
    x, params = [float(v) for v in x], [float(v) for v in params]
    c, m = len(x), mixtures
    n_pairs = c * (c - 1) // 2
    logits = params[:m]
    means = params[m: m + m * c]
    log_scales = params[m + m * c: m + 2 * m * c]
    coeffs = [mpmath.tanh(mpmath.mpf(v)) for v in params[m + 2 * m * c:]]
    lse_logits = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in logits))
    terms = []
    for k in range(m):
        total, pair = mpmath.mpf(logits[k]) - lse_logits, 0
        for i in range(c):
            mean = mpmath.mpf(means[k * c + i])  # the coupled mean, in 40 digits
            for j in range(i):
                mean += coeffs[k * n_pairs + pair] * x[j]
                pair += 1
            total += ref_bin_log_prob("logistic", x[i], mean, log_scales[k * c + i])
        terms.append(total)
    top = max(terms)
    return float(top + mpmath.log(mpmath.fsum(mpmath.exp(t - top) for t in terms)))


def mixture_params(mixtures, channels, n, g, extreme=False):
    """[P, n] parameters for n pixels: ordinary random ones, or extreme (log-scales at the bounds
    -7 and 7 and beyond, saturated coupling coefficients, means outside [-1, 1], lopsided logits)."""
    m, c = mixtures, channels
    logits = torch.randn(m, n, generator=g) * (8 if extreme else 1)
    means = (torch.rand(m * c, n, generator=g) * 2 - 1) * (1.5 if extreme else 0.9)
    if extreme:
        pick = torch.randint(0, 4, (m * c, n), generator=g)
        log_scales = torch.tensor([-7.0, 7.0, -9.0, -6.5])[pick]
        coeffs = torch.randn(m * c * (c - 1) // 2, n, generator=g).sign() * 6
    else:
        log_scales = torch.rand(m * c, n, generator=g) * 3 - 4.5
        coeffs = torch.randn(m * c * (c - 1) // 2, n, generator=g)
    return torch.cat([logits, means, log_scales, coeffs])


# --- 1. the 256 probabilities of a pixel sum to 1 ------------------------------------------------


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_bin_probabilities_sum_to_one(kind):
    mean = torch.tensor(MEANS).view(1, -1, 1)
    log_scale = torch.tensor(LOG_SCALES).view(1, 1, -1)
    logp = FUNCS[kind](XS.view(-1, 1, 1), mean, log_scale)
    assert logp.dtype == torch.float32 and logp.shape == (256, len(MEANS), len(LOG_SCALES))
    assert torch.isfinite(logp).all()
    total = logp.double().exp().sum(0)
    # 1e-5: the requirement (float32 log-probs, each good to ~1e-7 relative)
    bad = [(MEANS[i], LOG_SCALES[j], f"{total[i, j].item() - 1:+.2e}")
           for i in range(len(MEANS)) for j in range(len(LOG_SCALES)) if abs(total[i, j] - 1) > 1e-5]
    assert not bad, f"(mean, log_scale, sum - 1) off by more than 1e-5: {bad}"


def test_grayscale_mixture_sums_to_one():
    m, n = 3, 8
    g = gen(1)
    params = torch.cat([mixture_params(m, 1, n, g), mixture_params(m, 1, n, g, extreme=True)], dim=1)
    assert params.shape[0] == vm.mixture_param_count(m, 1)
    x = XS.view(256, 1, 1, 1)  # [256 values, C=1, H=1, W]
    logp = vm.discretized_logistic_mixture_log_prob(x, params.view(1, -1, 1, 2 * n), m)
    assert logp.dtype == torch.float32 and logp.shape == (256, 1, 2 * n)
    total = logp.double().exp().sum(0)
    # 1e-5: the requirement
    assert (total - 1).abs().max() < 1e-5, total - 1


def test_rgb_mixture_joint_sums_to_one_over_all_256_cubed_values():
    """The joint of one RGB pixel, by brute force over all 256^3 colours (in chunks of 8 reds) —
    the product evaluated at every colour, nothing assumed about its structure. Two components
    (~6 s single-threaded, so one parameter set): an ordinary one, and an extreme one with
    log-scales -6, 7 (near uniform) and -7 and saturated coupling coefficients (tanh 6), whose
    peaked blue channel's mean moves with red and green over the whole range and beyond.
    (The parameters are expanded to the colours' batch: see
    test_mixture_broadcasts_one_parameter_set_over_a_batch.)"""
    m, c = 2, 3
    params = torch.tensor([0.4, -0.2,  # logits
                           0.31, -0.42, 0.05,  # means, component 0 (ordinary): red, green, blue
                           0.37, -0.61, 0.2,  # component 1 (extreme)
                           -3.1, -2.2, -3.7,  # log-scales, component 0
                           -6.0, 7.0, -7.0,  # component 1
                           0.8, -0.5, 0.3,  # raw coefficients (green|red, blue|red, blue|green), component 0
                           6.0, -6.0, 6.0])  # component 1: c = +-0.99999
    assert params.shape[0] == vm.mixture_param_count(m, c) == 20
    params = params.view(1, -1, 1, 1)
    gb = torch.cartesian_prod(XS, XS)  # [65536, 2] (green, blue)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, 256, 8):
        red = XS[start: start + 8]
        x = torch.cat([red.repeat_interleave(gb.shape[0]).unsqueeze(1), gb.repeat(len(red), 1)], dim=1)
        logp = vm.discretized_logistic_mixture_log_prob(x.view(-1, 3, 1, 1), params.expand(len(x), -1, 1, 1), m)
        total += logp.double().exp().sum()
    # 1e-5: the requirement (16.7M float32 terms summed in float64)
    assert abs(total.item() - 1) < 1e-5, total.item() - 1


# --- 2. against brute force ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_log_prob_matches_brute_force(kind):
    # Every 3rd value plus both edges and the values around the means: 88+ x 8 means x 8 scales.
    idx = sorted(set(range(0, 256, 3)) | {1, 126, 127, 128, 129, 191, 254, 255})
    xs = XS[idx]
    log_scales = LOG_SCALES + [1.0, 2.0]  # 1, 2: the Gaussian's bins 2e-3 to 1e-2 standard units wide
    mean = torch.tensor(MEANS).view(1, -1, 1)
    log_scale = torch.tensor(log_scales).view(1, 1, -1)
    got = FUNCS[kind](xs.view(-1, 1, 1), mean, log_scale).double()
    want = torch.tensor([[[float(ref_bin_log_prob(kind, x, mu, ls)) for ls in log_scales] for mu in MEANS]
                         for x in xs.tolist()], dtype=torch.float64)
    slope = torch.tensor([[[abs(ref_bin_grad(kind, x, mu, ls)[0]) for ls in log_scales] for mu in MEANS]
                          for x in xs.tolist()], dtype=torch.float64)
    # logistic: float32 throughout, a few ulps of log p (the product's identity has no cancellation).
    # gaussian: log Phi(a) - log Phi(b) where the bin is ~1e-3 standard units wide cancels all but
    # ~3 of float32's digits: up to ~1.5e-4 nats in the bins of a broad Gaussian (log_scale 1 to 2).
    # Both: the float32 centres to_symmetric(k / 255) are up to 6e-8 off the exact ones, which moves
    # log P by up to 1e-7 |d log P / dx| (d/dx = -d/dmean): the product may use either.
    atol, rtol = (1e-5, 2e-6) if kind == "logistic" else (2.5e-4, 2e-6)
    tol = atol + rtol * want.abs() + 1e-7 * slope
    err = (got - want).abs()
    i, j, k = torch.unravel_index((err - tol).argmax(), err.shape)
    assert torch.all(err <= tol), \
        (f"x={xs[i].item()}, mean={MEANS[j]}, log_scale={log_scales[k]}: "
         f"got {got[i, j, k].item()}, brute force {want[i, j, k].item()}")


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_far_tails_match_brute_force_where_naive_float32_underflows(kind):
    # (x, mean, log_scale): the case (x = -0.5 on the grid: k = 64), both open edges far
    # from the mean, and a bin far above the mean.
    cases = [(XS[64].item(), 0.9, -5.0), (-1.0, 3.0, -7.0), (1.0, -3.0, -7.0), (XS[200].item(), -0.9, -5.0),
             (XS[10].item(), 0.999, -7.0)]
    x, mean, log_scale = (torch.tensor(col) for col in zip(*cases))
    got = FUNCS[kind](x, mean, log_scale)
    cdf = torch.sigmoid if kind == "logistic" else torch.special.ndtr
    s = log_scale.exp()
    naive = torch.log(cdf((x - mean + 1 / 255) / s) - cdf((x - mean - 1 / 255) / s))
    assert torch.isinf(naive[0]), naive  # the case is indeed beyond naive float32
    want = torch.tensor([float(ref_bin_log_prob(kind, *case)) for case in cases], dtype=torch.float64)
    assert torch.isfinite(got).all() and (want < -100).all()
    # 1e-3 relative: the bound (float32 inputs x - mean carry ~1e-7 of rounding)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("extreme", [False, True], ids=["ordinary", "extreme"])
def test_mixture_matches_brute_force(channels, extreme):
    m, n = 3, 12
    g = gen(3 + channels + 10 * extreme)
    params = mixture_params(m, channels, n, g, extreme=extreme)  # [P, n]
    k = torch.randint(0, 256, (channels, n), generator=g)
    k[:, :3] = torch.tensor([0, 255, 127])  # both edges and the middle, in every channel
    x = XS[k]  # [C, n]
    got = vm.discretized_logistic_mixture_log_prob(x.view(channels, 1, n), params.view(-1, 1, n), m).view(n)
    want = torch.tensor([ref_mixture_log_prob(x[:, i].tolist(), params[:, i].tolist(), m) for i in range(n)],
                        dtype=torch.float64)
    # ordinary: a few float32 ulps. extreme: the float32 coupled mean and tanh carry ~1e-7 absolute,
    # which a scale of e^-7 turns into ~1e-4 in the standard units and ~1e-4 nats of log p.
    atol, rtol = (2e-5, 2e-6) if not extreme else (5e-4, 1e-5)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


# --- 3. gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_gradients_finite_at_the_edges_for_extreme_parameters(kind):
    x = torch.tensor([-1.0, 0.0, 1.0, XS[1].item(), XS[254].item()]).view(-1, 1, 1)
    means = torch.tensor([-100.0, -3.0, -1.0, -0.999, 0.0, 0.999, 1.0, 3.0, 100.0]).view(1, -1, 1)
    log_scales = torch.tensor([-20.0, -7.0, -5.0, 0.0, 5.0, 7.0, 20.0]).view(1, 1, -1)
    shape = (x.shape[0], means.shape[1], log_scales.shape[2])
    mean = means.expand(shape).clone().requires_grad_()  # one leaf element per term
    log_scale = log_scales.expand(shape).clone().requires_grad_()
    logp = FUNCS[kind](x, mean, log_scale)
    assert torch.isfinite(logp).all()
    logp.sum().backward()
    assert torch.isfinite(mean.grad).all(), mean.grad
    assert torch.isfinite(log_scale.grad).all(), log_scale.grad


def test_mixture_gradients_finite_at_the_edges_for_extreme_parameters():
    m, c, n = 3, 3, 64
    g = gen(5)
    params = mixture_params(m, c, n, g, extreme=True)
    params[m: m + m * c] = torch.tensor([-100.0, -3.0, 3.0, 100.0])[torch.randint(0, 4, (m * c, n), generator=g)]
    params[m + m * c: m + 2 * m * c, : n // 2] = -7.0  # exactly at the clamp bounds too
    params[m + m * c: m + 2 * m * c, n // 2:] = 7.0
    params[:m, :8] = torch.tensor([[60.0], [-60.0], [0.0]])  # a saturated softmax
    params = params.view(1, -1, 1, n).requires_grad_()
    x = torch.tensor([-1.0, 0.0, 1.0])[torch.randint(0, 3, (4, c, 1, n), generator=g)]
    logp = vm.discretized_logistic_mixture_log_prob(x, params.expand(4, -1, 1, n), m)
    assert torch.isfinite(logp).all()
    logp.sum().backward()
    assert torch.isfinite(params.grad).all()


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_gradients_match_brute_force(kind):
    g = gen(6)
    n = 24
    # ordinary: x within a few scales of the mean (and both open edges)
    mean = torch.rand(n, generator=g) * 2 - 1
    log_scale = torch.rand(n, generator=g) * 4 - 4.5
    x = vm.to_symmetric(torch.round(((mean + log_scale.exp() * 3 * torch.randn(n, generator=g)).clamp(-1, 1) + 1)
                                    * 127.5) / 255)
    x[:2] = torch.tensor([-1.0, 1.0])
    # far tails, 200 to 33000 scales from the mean: the case, interior bins, open edges
    far = [(XS[64].item(), 0.9, -5.0), (0.0, -3.0, -7.0), (XS[128].item(), 3.0, -7.0), (0.0, -30.0, -7.0),
           (-1.0, 0.5, -7.0), (1.0, -0.5, -6.0)]
    x = torch.cat([x, torch.tensor([f[0] for f in far])])
    mean = torch.cat([mean, torch.tensor([f[1] for f in far])]).requires_grad_()
    log_scale = torch.cat([log_scale, torch.tensor([f[2] for f in far])]).requires_grad_()
    FUNCS[kind](x, mean, log_scale).sum().backward()
    want = torch.tensor([ref_bin_grad(kind, *v) for v in zip(x.tolist(), mean.tolist(), log_scale.tolist())],
                        dtype=torch.float64)
    got = torch.stack([mean.grad, log_scale.grad], dim=1).double()
    # ordinary: 1e-3 relative, float32 derivatives (the Gaussian's bins ~1e-3 standard units wide
    # cancel to ~1e-4). Far tails: 1e-2 relative, derivatives of log-probs of -1e2 to -1e9 nats.
    torch.testing.assert_close(got[:n], want[:n], rtol=1e-3, atol=1e-4)
    bad = [(case, got[n + i].tolist(), want[n + i].tolist()) for i, case in enumerate(far)
           if not torch.all((got[n + i] - want[n + i]).abs() <= 1e-4 + 1e-2 * want[n + i].abs())]
    assert not bad, f"far tails, ((x, mean, log_scale), got, brute force (d/dmean, d/dlog_scale)): {bad}"


def test_mixture_broadcasts_one_parameter_set_over_a_batch():
    # The elementwise likelihoods broadcast x against the parameters either way round; so should the
    # mixture: one parameter set [1, P, H, W] (or [P, H, W]) for a batch of images [B, C, H, W].
    m, c = 2, 3
    g = gen(15)
    params = mixture_params(m, c, 4, g).view(1, -1, 2, 2)
    x = XS[torch.randint(0, 256, (5, c, 2, 2), generator=g)]
    want = vm.discretized_logistic_mixture_log_prob(x, params.expand(5, -1, 2, 2), m)
    torch.testing.assert_close(vm.discretized_logistic_mixture_log_prob(x, params, m), want, rtol=0, atol=0)
    lik = build_likelihood("discretized_logistic", (c, 2, 2), m)
    torch.testing.assert_close(lik.log_prob((x + 1) / 2, params[0]), want.flatten(-2).sum(-1), rtol=1e-6, atol=1e-4)


# --- 4. float32 inside bf16 autocast -------------------------------------------------------------


def test_float32_inside_bf16_autocast():
    g = gen(7)
    x = XS[torch.randint(0, 256, (4, 3, 5, 5), generator=g)].bfloat16()
    mean = (torch.randn(4, 3, 5, 5, generator=g) * 0.7).bfloat16()
    log_scale = (torch.rand(4, 3, 5, 5, generator=g) * 6 - 6).bfloat16()
    params = mixture_params(3, 3, 4 * 25, g).view(-1, 4, 5, 5).movedim(1, 0).bfloat16()  # [4, 30, 5, 5]
    for fn in FUNCS.values():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, mean, log_scale)
        assert out.dtype == torch.float32
        # the same float32 operations on the same (exactly upcast) values: identical results
        assert torch.equal(out, fn(x.float(), mean.float(), log_scale.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vm.discretized_logistic_mixture_log_prob(x, params, 3)
    assert out.dtype == torch.float32 and out.shape == (4, 5, 5)
    assert torch.equal(out, vm.discretized_logistic_mixture_log_prob(x.float(), params.float(), 3))


@pytest.mark.parametrize("name,mixtures", [("discretized_logistic", 1), ("discretized_gaussian", 1),
                                           ("discretized_logistic", 3)])
def test_likelihood_log_prob_is_float32_under_bf16_autocast(name, mixtures):
    # As in training: data float32 (uint8 / 255), the decoder's output bf16 from autocast.
    lik = build_likelihood(name, (3, 4, 4), mixtures)
    g = gen(8)
    x = X01[torch.randint(0, 256, (2, 3, 4, 4), generator=g)]
    decoder = torch.nn.Linear(5, math.prod(lik.param_shape))
    torch.nn.init.normal_(decoder.weight, std=0.5, generator=g)
    z = torch.randn(3, 2, 5, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = decoder(z).view(3, 2, *lik.param_shape)
        assert params.dtype == torch.bfloat16
        out = lik.log_prob(x, params)
    assert out.dtype == torch.float32 and out.shape == (3, 2)
    assert torch.equal(out, lik.log_prob(x, params.float()))


# --- 5. the likelihood classes -------------------------------------------------------------------

CLASSES = [("discretized_logistic", 1), ("discretized_gaussian", 1), ("discretized_logistic", 3)]
SHAPES = [(3, 8, 8), (8, 8)]


def random_params(lik, lead, g):
    """Decoder-like parameters [*lead, P, H, W]: locations in [-1, 1], log-scales -4.5 to -1.5."""
    c = lik.channels
    if getattr(lik, "mixtures", None):
        p = mixture_params(lik.mixtures, c, math.prod(lead) * lik.h * lik.w, g)
        return p.view(-1, *lead, lik.h, lik.w).movedim(0, len(lead))
    loc = torch.rand(*lead, c, lik.h, lik.w, generator=g) * 2 - 1
    log_scale = torch.rand(*lead, c, lik.h, lik.w, generator=g) * 3 - 4.5
    return torch.cat([loc, log_scale], dim=-3)


@pytest.mark.parametrize("shape", SHAPES, ids=["rgb", "gray"])
@pytest.mark.parametrize("name,mixtures", CLASSES, ids=["logistic", "gaussian", "mixture3"])
def test_build_likelihood_log_prob_shape_and_per_element_sum(name, mixtures, shape):
    lik = build_likelihood(name, shape, mixtures)
    assert lik.discrete
    c = 1 if len(shape) == 2 else shape[0]
    p = 2 * c if mixtures == 1 else vm.mixture_param_count(mixtures, c)
    assert tuple(lik.param_shape) == (p, 8, 8)
    kk, b = 4, 3
    g = gen(9)
    params = random_params(lik, (kk, b), g)
    assert params.shape == (kk, b, *lik.param_shape)
    x = X01[torch.randint(0, 256, (b, *shape), generator=g)]
    x.view(-1)[:2] = torch.tensor([0.0, 1.0])  # both open edges
    out = lik.log_prob(x, params)
    assert out.shape == (kk, b) and out.dtype == torch.float32 and torch.isfinite(out).all()
    xs = vm.to_symmetric(x.reshape(b, c, 8, 8))
    if mixtures == 1:
        mean, log_scale = params[..., :c, :, :], params[..., c:, :, :]  # means first, then log-scales
        per_element = FUNCS[name.split("_")[1]](xs, mean, log_scale)  # [K, B, C, H, W]
    else:
        per_element = vm.discretized_logistic_mixture_log_prob(xs, params, mixtures)  # [K, B, H, W]
    want = per_element.double().flatten(2).sum(-1)
    # float32 sums of a few hundred terms of ~5 nats: 1e-5 relative
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=["rgb", "gray"])
@pytest.mark.parametrize("name,mixtures", CLASSES, ids=["logistic", "gaussian", "mixture3"])
def test_draw_and_mean_are_8bit_pixels_in_range(name, mixtures, shape):
    lik = build_likelihood(name, shape, mixtures)
    g = gen(10)
    params = random_params(lik, (2, 3), g)
    params[0] *= 4  # the first K: locations (and logits, coefficients) far beyond, log-scales at the clamp
    mean = lik.mean(params)
    draw = lik.draw(params, gen(11))
    for v in (mean, draw):
        assert v.shape == (2, 3, *shape) and v.dtype == torch.float32
        assert v.min() >= 0 and v.max() <= 1
    # on the grid: 255 x is an integer up to float32 rounding
    assert ((draw * 255 - (draw * 255).round()).abs() < 1e-4).all()
    torch.testing.assert_close(lik.draw(params, gen(11)), draw, rtol=0, atol=0)  # seeded: reproducible


@pytest.mark.parametrize("shape", SHAPES, ids=["rgb", "gray"])
@pytest.mark.parametrize("name,mixtures", CLASSES, ids=["logistic", "gaussian", "mixture3"])
def test_small_scale_draw_and_mean_are_the_location(name, mixtures, shape):
    """Locations at bin centres (and beyond both ends), log-scale -20, which the product clamps to
    -7 (a bin is 8.6 standard units wide). The Gaussian then leaves the bin with P = 2e-5 per pixel
    (and the draws are seeded): every draw is the location. The logistic at e^-7 keeps the centre
    bin only with the probability its own log_prob gives (~0.972), so its draws are checked
    against that frequency and to stay within a few bins."""
    lik = build_likelihood(name, shape, mixtures)
    c, b = lik.channels, 64
    g = gen(12)
    k = torch.randint(0, 256, (b, c, 8, 8), generator=g)
    loc = XS[k]
    loc[:, :, 0, 0], loc[:, :, 0, 1] = 1.7, -2.5  # beyond the ends: the mean clamps, draws hit 1 and 0
    want = X01[k]
    want[:, :, 0, 0], want[:, :, 0, 1] = 1.0, 0.0
    want = want.reshape(b, *shape)
    if mixtures == 1:
        params = torch.cat([loc, torch.full_like(loc, -20.0)], dim=1)
    else:  # one dominant component (softmax weight 1 - e^-60) with the location, no coupling
        m = mixtures
        logits = torch.tensor([60.0] + [0.0] * (m - 1)).view(1, m, 1, 1).expand(b, m, 8, 8)
        means = torch.cat([loc, torch.zeros(b, (m - 1) * c, 8, 8)], dim=1)
        params = torch.cat([logits, means, torch.full((b, m * c, 8, 8), -20.0),
                            torch.zeros(b, m * c * (c - 1) // 2, 8, 8)], dim=1)
    # mean: the location itself (clamped to [-1, 1]); 1e-6: float32 (x + 1) / 2
    torch.testing.assert_close(lik.mean(params), want, rtol=0, atol=1e-6)
    draw = lik.draw(params, gen(13))
    hit = ((draw - want).abs() < 1e-6).float()
    assert hit.view(b, -1)[:, 0].all() and hit.view(b, c, 8, 8)[:, :, 0, :2].all()  # far beyond: exact
    if name == "discretized_gaussian":
        assert hit.all(), f"{int((1 - hit).sum())} of {hit.numel()} draws left the location's bin"
    else:
        p_bin = vm.discretized_logistic_log_prob(XS[127], XS[127], torch.tensor(-20.0)).exp().item()
        interior = hit.view(b, c, 8, 8)[:, :, 1:, :]  # locations at interior bin centres (mostly)
        n = interior.numel()
        # the frequency of the centre bin: the model's own P(bin) within 5 binomial standard errors
        assert abs(interior.mean().item() - p_bin) < 5 * math.sqrt(p_bin * (1 - p_bin) / n) + 2 / n, \
            (interior.mean().item(), p_bin)
        # and a miss is a neighbour: the logistic at e^-7 puts < 1e-6 beyond 6 bins
        assert ((draw - want).abs() * 255 < 6.5).all()


@pytest.mark.parametrize("name,mixtures,channels", [("discretized_logistic", 1, 1), ("discretized_gaussian", 1, 1),
                                                    ("discretized_logistic", 2, 3)],
                         ids=["logistic", "gaussian", "rgb-mixture2"])
def test_draw_frequencies_match_log_prob(name, mixtures, channels):
    """20,000 draws of one pixel against exp(log_prob): every colour's count is plausible under its
    probability, and the colours never drawn carry little mass. For the RGB mixture this checks the
    joint, so the draw's channel coupling must be log_prob's."""
    shape = (channels, 1, 1)
    lik = build_likelihood(name, shape, mixtures)
    g = gen(14)
    if mixtures == 1:
        one = torch.tensor([0.3, -2.0]).view(2, 1, 1)  # location, log-scale: spread over ~10 bins
    else:
        one = torch.cat([torch.tensor([0.5, -0.3]),  # logits
                         torch.tensor([0.2, -0.4, 0.1, -0.6, 0.5, 0.3]),  # means [M, C]
                         torch.full((6,), -5.3),  # log-scales: a few bins each
                         torch.tensor([1.0, -0.8, 0.6, -1.2, 0.4, 0.9])]).view(-1, 1, 1)  # raw coefficients
    n = 20_000
    draw = lik.draw(one.expand(n, *one.shape), g)  # [n, C, 1, 1]
    codes = (draw * 255).round().long().view(n, channels)
    cells, counts = torch.unique(codes, dim=0, return_counts=True)
    logp = lik.log_prob(cells.float().view(-1, *shape) / 255, one.unsqueeze(0).expand(len(cells), *one.shape))
    lam = logp.double().exp() * n  # expected counts of the drawn colours
    c = counts.double()
    # Poisson tails of each count (binomial with small p; wider for large p): P(X >= c), P(X <= c)
    upper = torch.special.gammainc(c, lam)
    lower = torch.special.gammaincc(c + 1, lam)
    worst = torch.minimum(upper, lower).argmin()
    # 1e-7 per colour: with up to a few thousand colours, a false alarm is < 1e-3
    assert torch.minimum(upper, lower).min() > 1e-7, \
        f"colour {cells[worst].tolist()} drawn {int(c[worst])} times, expected {lam[worst].item():.3g}"
    # the colours never drawn carry little mass (else draws are missing a mode)
    assert lam.sum() / n > 0.95, lam.sum() / n


def test_bits_per_dim_of_uniform_is_eight():
    # log p = -D ln 256 (256 equally likely values per dimension) is 8 bits/dim, float or tensor
    for d in (1, 784, 3 * 32 * 32):
        assert vm.bits_per_dim(-d * math.log(256.0), d) == pytest.approx(8.0, rel=1e-12)
        t = vm.bits_per_dim(torch.full((5,), -d * math.log(256.0)), d)
        torch.testing.assert_close(t, torch.full((5,), 8.0))
