"""Improved DDPM (Nichol & Dhariwal 2021) and the prediction targets, stated in code: the bound's pieces,
learned variances, the hybrid loss's stop-gradient, importance sampling, respacing; eps/x0/v; Min-SNR."""
import math

import pytest
import torch

from ddpm import GaussianDiffusion
from improved_ddpm import (TimestepSampler, discretized_gaussian_log_likelihood, nll_bits_per_dim, normal_kl,
                           prior_bits_per_dim, respace, training_loss)
from model import build_model
from utils import UsageError


def grid_images(*shape):
    """Random images on the 256-level grid in [-1, 1], like images loaded from files."""
    return torch.randint(0, 256, shape) / 127.5 - 1


# --- eps, x_0 and v -------------------------------------------------------------------------------

def test_eps_x0_and_v_conversions_are_exact_inverses():
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=1000, schedule="cosine")
    x0, eps = torch.rand(8, 3, 4, 4) * 2 - 1, torch.randn(8, 3, 4, 4)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 990, 999])
    xt = d.q_sample(x0, t, eps)
    v = d.v_target(x0, t, eps)
    assert torch.allclose(d.predict_x0_from_v(xt, t, v), x0, atol=1e-5)
    assert torch.allclose(d.predict_eps_from_v(xt, t, v), eps, atol=1e-5)
    # Through eps or x_0 the float32 error is amplified by 1/sqrt(ab) (large as t -> T) or
    # 1/sqrt(1 - ab) (large as t -> 0): those ends are left out here.
    assert torch.allclose(d.predict_x0_from_eps(xt[:6], t[:6], eps[:6]), x0[:6], atol=1e-4)
    assert torch.allclose(d.predict_eps_from_x0(xt[2:], t[2:], x0[2:]), eps[2:], atol=1e-4)
    # v has unit variance for unit-variance data and noise, at every t: a^2 + s^2 = 1
    big_x0, big_eps = torch.randn(20000), torch.randn(20000)
    for step in (0, 500, 999):
        tt = torch.full((20000,), step)
        assert d.v_target(big_x0.reshape(-1, 1), tt, big_eps.reshape(-1, 1)).std().item() == pytest.approx(1, abs=0.03)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_every_prediction_target_gives_zero_loss_and_the_same_sampler_step_for_an_oracle(prediction):
    """A network that outputs the true target (eps, x_0 or v) has loss 0, and all three oracles give
    the same reverse step: the parameterisation changes what is learned, not the model."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=100, prediction=prediction)
    x0, eps, t = torch.rand(4, 1, 4, 4) * 2 - 1, torch.randn(4, 1, 4, 4), torch.tensor([3, 30, 60, 99])
    xt = d.q_sample(x0, t, eps)
    oracle = lambda x, t_, y: d.prediction_target(x0, t, eps)
    assert d.training_loss(oracle, x0, t=t, noise=eps)[0].abs().max().item() < 1e-10
    eps_model = GaussianDiffusion(timesteps=100)
    reference = eps_model.p_mean_variance(lambda x, t_, y: eps, xt, t, clip_denoised=False)["mean"]
    assert torch.allclose(d.p_mean_variance(oracle, xt, t, clip_denoised=False)["mean"], reference, atol=1e-4)


def test_min_snr_weights():
    """Hang et al.: weight min(SNR, gamma) on the x_0 error, i.e. min(SNR, gamma)/SNR for eps and
    min(SNR, gamma)/(SNR + 1) for v (not min(SNR + 1, gamma)/(SNR + 1)); off when gamma = 0."""
    t = torch.arange(1000)
    for prediction, divide in (("eps", lambda s: s), ("x0", lambda s: 1.0), ("v", lambda s: s + 1)):
        d = GaussianDiffusion(timesteps=1000, prediction=prediction, min_snr_gamma=5)
        assert torch.allclose(d.snr, d.alphas_cumprod / (1 - d.alphas_cumprod), rtol=1e-3)  # float32 1 - ab at t = 0
        snr = d.snr
        assert torch.allclose(d.min_snr_weight(t), torch.minimum(snr, torch.tensor(5.0)) / divide(snr), rtol=1e-5)
    v = GaussianDiffusion(timesteps=1000, prediction="v", min_snr_gamma=5)
    snr = v.snr
    assert not torch.allclose(v.min_snr_weight(t), torch.minimum(snr + 1, torch.tensor(5.0)) / (snr + 1))
    eps = GaussianDiffusion(timesteps=1000, min_snr_gamma=5)
    assert eps.min_snr_weight(t)[-1] == 1.0 and eps.min_snr_weight(t)[0] < 0.001  # noisy kept, clean damped
    assert torch.equal(GaussianDiffusion(timesteps=1000).min_snr_weight(t), torch.ones(1000))


def test_settings_that_do_not_fit_together_are_usage_errors():
    with pytest.raises(UsageError, match="--learn_sigma"):
        GaussianDiffusion(learn_sigma=True, loss="l2")
    with pytest.raises(UsageError, match="--loss hybrid"):
        GaussianDiffusion(loss="hybrid")
    with pytest.raises(UsageError, match="--variance learned"):
        GaussianDiffusion(variance="learned")
    with pytest.raises(UsageError, match="--prediction"):
        GaussianDiffusion(prediction="score")
    with pytest.raises(UsageError, match="--min_snr_gamma"):
        GaussianDiffusion(min_snr_gamma=-1)


# --- the bound's pieces ------------------------------------------------------------------------------

def test_kl_between_gaussians_is_zero_for_identical_and_positive_otherwise():
    mean, log_var = torch.randn(100), torch.randn(100)
    assert normal_kl(mean, log_var, mean, log_var).abs().max().item() < 1e-6
    other = normal_kl(mean, log_var, mean + 0.3, log_var - 0.2)
    assert torch.all(other > 0)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * log_var).exp()),
                                                   torch.distributions.Normal(mean + 0.3, (0.5 * (log_var - 0.2)).exp()))
    assert torch.allclose(other, reference, atol=1e-5)


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.3, 0.2), (-0.95, 0.05), (0.999, 1.5), (0.5, 1e-4)])
def test_the_discretised_decoder_is_a_distribution_over_the_256_levels(mean, std):
    """DDPM eq. 13: the probabilities of all 256 pixel values sum to 1 (the edge bins reach to +-inf)."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_p = discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=torch.float64),
                                                torch.tensor(2 * math.log(std), dtype=torch.float64))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    if abs(mean) + 3 * std < 1:  # (else the edge bins, stretched to infinity, rightly hold the most)
        assert torch.argmax(log_p).item() == int(torch.argmin((levels - mean).abs()))  # the nearest level


def test_learned_variance_interpolates_log_beta_and_log_beta_tilde():
    """Improved DDPM eq. 15 with v = (output + 1) / 2: output -1 gives beta~_t, +1 gives beta_t, and 0 their
    geometric mean (the logs are interpolated, not the variances)."""
    d = GaussianDiffusion(timesteps=100, loss="hybrid", learn_sigma=True)
    xt, t = torch.randn(3, 1, 2, 2), torch.tensor([1, 50, 99])
    def variance_for(output_value):
        model = lambda x, t_, y: torch.cat([torch.zeros_like(x), torch.full_like(x, output_value)], dim=1)
        return d.p_mean_variance(model, xt, t)["variance"][:, 0, 0, 0]
    assert torch.allclose(variance_for(-1.0), d.posterior_variance[t], rtol=1e-5)
    assert torch.allclose(variance_for(1.0), d.betas[t], rtol=1e-5)
    assert torch.allclose(variance_for(0.0), (d.posterior_variance[t] * d.betas[t]).sqrt(), rtol=1e-5)


def test_the_bound_has_zero_middle_terms_for_the_exact_denoiser():
    """With the true x_0 and sigma^2 = beta~, p_theta(x_{t-1} | x_t) is q(x_{t-1} | x_t, x_0): every KL
    term vanishes and the bound is decoder + prior. Total = sum of terms + prior."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=30)
    x0 = grid_images(2, 1, 4, 4)
    exact = lambda x, t, y: d.predict_eps_from_x0(x, t, x0)
    nll = nll_bits_per_dim(d, exact, x0)
    assert nll["terms"].shape == (2, 30)
    assert nll["terms"][:, 1:].abs().max().item() < 1e-3
    assert torch.allclose(nll["total"], nll["terms"].sum(1) + nll["prior"])
    assert torch.all(nll["decoder"] > 0) and torch.all(nll["prior"] >= 0)
    # L_T in closed form: KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2, m = sqrt(ab_T) x_0, s^2 = 1 - ab_T
    d = GaussianDiffusion(timesteps=1000)
    ab = d.alphas_cumprod[-1].double()
    expected = 0.5 * (ab * 1.0 + (1 - ab) - 1 - torch.log(1 - ab)) / math.log(2)
    prior = prior_bits_per_dim(d, torch.ones(1, 1, 4, 4)).item()
    assert prior == pytest.approx(expected.item(), rel=1e-2) and prior < 1e-4  # x_T is almost N(0, I)


# --- the hybrid and KL objectives --------------------------------------------------------------------

def test_hybrid_loss_is_finite_and_its_bound_part_trains_only_the_variances():
    """eq. 16: L_hybrid = L_simple + lambda L_vlb with a stop-gradient on the mean inside L_vlb, so the
    gradient of the L_vlb part reaches the variance channels and not the mean channels."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=50, loss="hybrid", learn_sigma=True)
    x0, noise, t = grid_images(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.tensor([0, 5, 25, 49])
    output = (0.3 * torch.randn(4, 2, 4, 4)).requires_grad_()
    losses, _ = training_loss(d, lambda x, t_, y: output, x0, t=t, noise=noise)
    assert losses.shape == (4,) and torch.all(torch.isfinite(losses))
    vlb_part = losses - d.simple_loss(output[:, :1], x0, t, noise)
    grad, = torch.autograd.grad(vlb_part.sum(), output)
    assert grad[:, :1].abs().max().item() == 0.0     # the mean: no gradient from L_vlb
    assert grad[:, 1:].abs().max().item() > 0.0      # the variances: trained by L_vlb

    kl = GaussianDiffusion(timesteps=50, loss="kl", learn_sigma=True)
    losses, _ = training_loss(kl, lambda x, t_, y: output, x0, t=t, noise=noise)
    grad, = torch.autograd.grad(losses.sum(), output)
    assert grad[:, :1].abs().max().item() > 0.0      # L_vlb alone trains the mean too


def test_a_learned_sigma_model_trains_on_the_hybrid_loss():
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=50, loss="hybrid", learn_sigma=True)
    model = build_model(dict(image_size=8, in_channels=1, out_channels=2, base_channels=16, channel_mults=[1, 2],
                             num_res_blocks=1, dropout=0.0))
    x0 = grid_images(4, 1, 8, 8).repeat(4, 1, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fixed_t, fixed_noise = torch.arange(0, 50, 50 / 16).long(), torch.randn_like(x0)
    evaluate = lambda: training_loss(d, model, x0, t=fixed_t, noise=fixed_noise)[0].mean().item()
    before = evaluate()
    for _ in range(60):
        loss = training_loss(d, model, x0)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert evaluate() < before / 2


# --- importance sampling of t ---------------------------------------------------------------------------

def test_loss_aware_sampler_is_uniform_until_full_then_favours_large_losses_without_bias():
    torch.manual_seed(0)
    sampler = TimestepSampler(10, "loss-aware")
    assert torch.allclose(sampler.probabilities(), torch.full((10,), 0.1, dtype=torch.float64))
    losses_at = torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    for _ in range(10):
        t = torch.arange(10)
        sampler.update(t, losses_at[t])
        if _ < 9:
            assert torch.allclose(sampler.probabilities(), torch.full((10,), 0.1, dtype=torch.float64))
    p = sampler.probabilities()
    assert p.sum().item() == pytest.approx(1.0) and p.argmax().item() == 0 and p[9] > p[1]
    # E_{t ~ p}[L_t / (T p_t)] = mean_t L_t: the weights undo the bias of the sampling
    t, weights = sampler.sample(200000, "cpu")
    assert (losses_at[t] * weights).mean().item() == pytest.approx(losses_at.mean().item(), rel=0.02)
    again = TimestepSampler(10, "loss-aware")
    again.load_state_dict(sampler.state_dict())
    assert torch.equal(again.probabilities(), p)
    # A non-finite loss (a step train.py skips) is not recorded: one would turn every p_t into NaN.
    sampler.update(torch.tensor([0, 3]), torch.tensor([float("nan"), float("inf")]))
    assert torch.equal(sampler.probabilities(), p)
    uniform = TimestepSampler(10)
    uniform.update(torch.arange(10), losses_at)
    t, weights = uniform.sample(5, "cpu")
    assert torch.equal(weights, torch.ones(5))


# --- respacing ------------------------------------------------------------------------------------------

def test_respacing_with_all_T_steps_gives_back_the_original_betas():
    d = GaussianDiffusion(timesteps=1000, schedule="cosine")
    same = respace(d, 1000)
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert torch.allclose(getattr(same, name), getattr(d, name), rtol=1e-6, atol=0), name
    assert torch.equal(same.timestep_map, torch.arange(1000))


def test_respacing_keeps_the_marginals_and_feeds_the_network_its_own_t():
    """eq. 19: beta_i = 1 - ab_{tau_i} / ab_{tau_{i-1}} keeps alpha_bar at every kept step, so q(x_t | x_0)
    is unchanged there; sampling visits the S kept steps, calling the network with t = tau_i."""
    d = GaussianDiffusion(timesteps=1000)
    spaced = respace(d, 10)
    tau = spaced.timestep_map
    assert len(spaced.betas) == 10 and tau.tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert torch.allclose(spaced.alphas_cumprod, d.alphas_cumprod[tau], rtol=1e-5)
    assert spaced.betas[0] == d.betas[0]  # tau_0 = 0: the first step is the original first step
    assert torch.all(spaced.betas[1:] > 10 * d.betas[tau[1:]])  # a long jump adds far more noise than one step
    calls = []
    def model(x, t, y):
        calls.append(t[0].item())
        return torch.zeros_like(x)
    spaced.sample(model, (2, 1, 4, 4), progress=False)
    assert calls == tau.flip(0).tolist()


@pytest.mark.parametrize("variance", ["posterior", "beta", "learned"])
def test_respacing_to_one_step_samples_the_predicted_x0(variance):
    """S = 1 keeps tau_0 = T-1 alone: beta = 1 - alpha_bar_{T-1} and beta~ = 0, so Algorithm 2's single step
    returns x^_0 of the pure-noise input. With a network that knows x_0 that is x_0 itself (the one-step
    schedule has no next beta~ to stand in for log beta~_0; it once built an empty tensor there)."""
    learned = variance == "learned"
    d = GaussianDiffusion(timesteps=100, variance=variance, learn_sigma=learned, loss="hybrid" if learned else "l2")
    one = respace(d, 1)
    assert one.timestep_map.tolist() == [99] and torch.allclose(one.betas, 1 - d.alphas_cumprod[-1:])
    assert torch.isfinite(one.posterior_log_variance_clipped).all() and one.posterior_log_variance_clipped.shape == (1,)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    def model(x, t, y):  # the exact eps of x_t for this x0 (DDPM eq. 4 solved for eps)
        ab = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learned else eps
    assert torch.allclose(one.sample(model, (2, 1, 4, 4), progress=False), x0, atol=1e-3)
