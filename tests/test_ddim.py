"""DDIM (Song et al. 2020) stated in code: the sub-sequence, eq. 12 and eq. 16, determinism, inversion."""
import math

import pytest
import torch

from ddim import (check_eta, ddim_invert, ddim_sample, ddim_sigma, ddim_step, ddim_timesteps, interpolation_noise,
                  slerp)
from ddpm import GaussianDiffusion, make_beta_schedule
from model import build_model
from utils import UsageError


def exact_denoiser(d, target):
    """The perfect eps_theta for a data set of one image: eps = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t)."""
    def model(x, t, y):
        return ((x - d.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1) * target)
                / d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1))
    return model


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50, 999, 1000])
def test_sub_sequence_is_increasing_distinct_and_spans_the_steps(spacing, steps):
    tau = ddim_timesteps(1000, steps, spacing)
    assert len(tau) == steps and tau.dtype == torch.long
    assert tau[-1] == 999  # always starts where x_T ~ N(0, I)
    assert steps == 1 or tau[0] == 0
    assert torch.all(tau[1:] > tau[:-1])
    if steps == 1000:
        assert torch.equal(tau, torch.arange(1000))


def test_quadratic_spacing_is_dense_near_t_0():
    tau = ddim_timesteps(1000, 10, "quadratic")
    gaps = tau[1:] - tau[:-1]
    assert torch.all(gaps[1:] >= gaps[:-1])  # the gaps only grow with t
    assert gaps[0] < 1000 / 9 < gaps[-1]


def test_steps_outside_1_to_T_are_usage_errors():
    for steps in (0, 101):
        with pytest.raises(UsageError, match="--steps"):
            ddim_timesteps(100, steps)


def test_eta_1_over_all_T_steps_has_the_ddpm_posterior_variance_at_every_step():
    """DDIM eq. 16 with consecutive steps and eta = 1 is sqrt(beta~_t) of DDPM eq. 7, for every t."""
    d = GaussianDiffusion(timesteps=1000, schedule="cosine")
    alphas_cumprod = torch.cumprod(1 - make_beta_schedule("cosine", 1000), 0)  # float64: beta_1 is only 4e-5
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    sigma = ddim_sigma(alphas_cumprod, alphas_cumprod_prev, eta=1.0)
    assert torch.allclose(sigma ** 2, d.posterior_variance.double(), rtol=1e-5, atol=1e-12)
    assert torch.all(ddim_sigma(d.alphas_cumprod, d.alphas_cumprod_prev, eta=0.0) == 0)


def test_eq_12_direction_term_is_real_for_eta_up_to_1_and_eta_outside_0_to_1_is_refused():
    """Eq. 12's sqrt(1 - alpha_bar_prev - sigma_t^2) with eq. 16's sigma: non-negative under the root for
    every eta in [0, 1], sub-sequence and schedule (so ddim_step's clamp only absorbs float rounding), and
    negative just above 1 (S = 50 of T = 1000, linear, on the step into tau_0), which is why --eta stops at 1."""
    for schedule in ("linear", "cosine"):
        alphas_cumprod = torch.cumprod(1 - make_beta_schedule(schedule, 1000), 0)  # float64
        for steps, spacing in ((1000, "uniform"), (50, "uniform"), (50, "quadratic"), (7, "uniform")):
            tau = ddim_timesteps(1000, steps, spacing)
            ab_t = alphas_cumprod[tau]
            ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[tau[:-1]]])
            for eta in (0.0, 0.5, 1.0):
                assert torch.all(1 - ab_prev - ddim_sigma(ab_t, ab_prev, eta) ** 2 >= -1e-15), (schedule, steps, eta)
            if schedule == "linear" and (steps, spacing) == (50, "uniform"):
                under_root = 1 - ab_prev - ddim_sigma(ab_t, ab_prev, 1.01) ** 2
                assert under_root[1] < 0 and torch.all(under_root[2:] > 0)  # tau_1 -> tau_0 only
    for eta in (-0.1, 1.01, float("nan")):
        with pytest.raises(UsageError, match="--eta"):
            check_eta(eta)
    d = GaussianDiffusion(timesteps=20)
    with pytest.raises(UsageError, match="must be between 0"):
        ddim_sample(d, exact_denoiser(d, torch.zeros(1, 1, 2, 2)), (1, 1, 2, 2), steps=5, eta=1.5, progress=False)


def test_eta_1_over_all_steps_is_the_ddpm_ancestral_step():
    """The whole update, not only its variance: with eta = 1 and t_prev = t - 1, eq. 12 is DDPM's step
    mu~_t(x_t, x^_0) + sqrt(beta~_t) z (Algorithm 2 line 4 with sigma^2 = beta~), for any network."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=100)
    model = lambda x, t, y: torch.sin(3 * x) + 0.01 * t.reshape(-1, 1, 1, 1)  # any deterministic "network"
    x, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in (1, 17, 60, 99):
        ddim_x, _ = ddim_step(d, model, x, t, t - 1, eta=1.0, clip_denoised=False, noise=z)
        out = d.p_mean_variance(model, x, torch.full((2,), t), clip_denoised=False)
        ddpm_x = out["mean"] + out["variance"].sqrt() * z
        assert torch.allclose(ddim_x, ddpm_x, atol=1e-4), t


def test_ddim_is_deterministic_given_x_T_and_ddpm_like_with_eta():
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=50)
    model = lambda x, t, y: 0.5 * x
    x_T = torch.randn(2, 1, 4, 4)
    torch.manual_seed(1)
    a = ddim_sample(d, model, x_T.shape, steps=10, eta=0.0, noise=x_T, progress=False)
    torch.manual_seed(2)  # a different random state changes nothing when eta = 0
    b = ddim_sample(d, model, x_T.shape, steps=10, eta=0.0, noise=x_T, progress=False)
    assert torch.equal(a, b)
    c = ddim_sample(d, model, x_T.shape, steps=10, eta=1.0, noise=x_T, progress=False)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_S_steps_make_exactly_S_network_calls_down_the_sub_sequence(spacing):
    d = GaussianDiffusion(timesteps=1000)
    calls = []
    def model(x, t, y):
        calls.append(t[0].item())
        return torch.zeros_like(x)
    out, trajectory = ddim_sample(d, model, (2, 1, 4, 4), steps=20, spacing=spacing, trajectory_every=5,
                                  progress=False)
    assert calls == ddim_timesteps(1000, 20, spacing).flip(0).tolist()
    assert out.shape == (2, 1, 4, 4) and len(trajectory) == 5  # the first step, then every 5th


@pytest.mark.parametrize("steps", [3, 10, 50])
def test_ddim_returns_the_one_training_image_with_the_exact_denoiser_at_any_step_count(steps):
    """With the perfect eps_theta every predicted x_0 is x*, so eq. 12 lands on x* whatever the jumps."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=50)
    target = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    out = ddim_sample(d, exact_denoiser(d, target), (2, 3, 4, 4), steps=steps, progress=False)
    assert torch.allclose(out, target.expand(2, -1, -1, -1), atol=1e-4)


def test_inversion_then_generation_returns_the_input_on_a_tiny_trained_model():
    """Encode real images to x_T with eq. 12 run forwards (eta = 0), decode with eq. 12: the ODE retraces
    its path, so the round trip lands close to the input, far closer than decoding a random x_T."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=100)
    model = build_model(dict(image_size=8, in_channels=1, base_channels=16, channel_mults=[1, 2],
                             num_res_blocks=1, dropout=0.0))
    images = (torch.rand(4, 1, 8, 8) > 0.5).float() * 1.6 - 0.8
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):  # a few seconds: enough for a smooth, image-aware eps_theta
        loss = d.training_loss(model, images.repeat(4, 1, 1, 1))[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x_T = ddim_invert(d, model, images, steps=50, progress=False)
    assert x_T.std().item() > 0.5  # it is noise-like, not the image
    back = ddim_sample(d, model, images.shape, steps=50, noise=x_T, clip_denoised=False, progress=False)
    random_start = ddim_sample(d, model, images.shape, steps=50, clip_denoised=False, progress=False)
    error = (back - images).abs().mean().item()
    assert error < 0.06, error  # about 0.02 here; 0.01 with 100 steps
    assert error < (random_start - images).abs().mean().item() / 5


def test_slerp_keeps_the_ends_and_the_norm():
    torch.manual_seed(0)
    z0, z1 = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    assert torch.allclose(slerp(z0, z1, 0.0), z0, atol=1e-5) and torch.allclose(slerp(z0, z1, 1.0), z1, atol=1e-5)
    # two orthogonal unit vectors: the midpoint is (z0 + z1) / sqrt(2), still of unit length
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(e0, e1, 0.5), (e0 + e1) / math.sqrt(2), atol=1e-6)
    # for noise of equal norm the whole path keeps that norm, where a straight line would shrink it
    z1 = z1 * z0.norm() / z1.norm()
    for alpha in (0.25, 0.5, 0.75):
        assert slerp(z0, z1, alpha).norm().item() == pytest.approx(z0.norm().item(), rel=1e-4)
    assert ((z0 + z1) / 2).norm() < 0.8 * z0.norm()
    strip = interpolation_noise(z0, z1, 5)
    assert strip.shape == (5, 3, 8, 8) and torch.allclose(strip[-1], z1, atol=1e-5)
