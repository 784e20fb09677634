"""The identities of Ho et al. 2020 (and the schedules), stated in code. Each test is a worked example."""
import math

import pytest
import torch

from ddpm import GaussianDiffusion, cosine_beta_schedule, linear_beta_schedule, make_beta_schedule
from utils import UsageError

torch.set_default_dtype(torch.float32)


def test_timestep_convention_code_t_is_paper_t_plus_one():
    """Code t = 0 .. T-1 holds the paper's t = 1 .. T: betas[0] is beta_1 = 1e-4, betas[T-1] is
    beta_T = 0.02 (DDPM Sec. 4), alphas_cumprod[t] multiplies alphas[0..t], and the 'previous'
    alpha_bar of code t = 0 (paper alpha_bar_0) is 1."""
    d = GaussianDiffusion(timesteps=1000, schedule="linear")
    assert d.betas.shape == (1000,)
    assert d.betas[0].item() == pytest.approx(1e-4)
    assert d.betas[-1].item() == pytest.approx(0.02)
    assert d.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert d.alphas_cumprod[-1].item() == pytest.approx(torch.prod(1 - linear_beta_schedule(1000)).item(), rel=1e-5)
    assert d.alphas_cumprod_prev[0].item() == 1.0
    assert torch.allclose(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [10, 50, 100, 250, 1000, 4000])
def test_terminal_signal_is_near_zero_for_every_schedule_and_T(schedule, timesteps):
    """x_T must be (almost) pure noise so that sampling may start from N(0, I):
    sqrt(alpha_bar_T) is the fraction of the image left at the end."""
    d = GaussianDiffusion(timesteps=timesteps, schedule=schedule)
    assert d.sqrt_alphas_cumprod[-1].item() < 0.01
    assert torch.all(d.betas > 0) and torch.all(d.betas < 1)
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])  # noise only ever grows


def test_cosine_schedule_matches_iddpm_eq_17():
    """alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), wherever beta was not clipped."""
    T, s = 100, 0.008
    alphas_cumprod = torch.cumprod(1 - cosine_beta_schedule(T), 0)
    f = lambda t: math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2
    for paper_t in (1, 10, 50, 90):
        assert alphas_cumprod[paper_t - 1].item() == pytest.approx(f(paper_t) / f(0), rel=1e-9)


def test_closed_form_marginal_matches_iterating_single_steps():
    """q(x_t | x_0) of eq. 4 equals applying q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    (eq. 2) t times: the mean scale is prod sqrt(alpha_s) and the variance follows
    var_t = alpha_t var_{t-1} + beta_t from 0, which must equal 1 - alpha_bar_t."""
    d = GaussianDiffusion(timesteps=200, schedule="cosine")
    scale, variance = 1.0, 0.0
    for t in range(200):
        scale *= math.sqrt(1 - d.betas[t].item())
        variance = (1 - d.betas[t].item()) * variance + d.betas[t].item()
        assert scale == pytest.approx(d.sqrt_alphas_cumprod[t].item(), rel=1e-4, abs=1e-6)
        assert math.sqrt(variance) == pytest.approx(d.sqrt_one_minus_alphas_cumprod[t].item(), rel=1e-4)


def test_closed_form_marginal_matches_iterated_sampling_empirically():
    """The same identity by simulation: noise one image step by step and in one shot, compare statistics."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=50)
    x0 = torch.full((20000, 1), 0.7)
    x = x0.clone()
    for t in range(30):  # 30 single steps of eq. 2
        x = (1 - d.betas[t]).sqrt() * x + d.betas[t].sqrt() * torch.randn_like(x)
    direct = d.q_sample(x0, torch.full((20000,), 29), torch.randn_like(x0))  # one step of eq. 4
    assert x.mean().item() == pytest.approx(direct.mean().item(), abs=0.03)
    assert x.std().item() == pytest.approx(direct.std().item(), abs=0.03)


def test_posterior_is_the_bayes_posterior_of_the_forward_process():
    """Eq. 7 from Gaussian conditioning: with prior q(x_{t-1} | x_0) = N(sqrt(ab_{t-1}) x_0, 1 - ab_{t-1})
    and likelihood q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, beta_t), the posterior precision is
    1/(1 - ab_{t-1}) + a_t/beta_t and the mean is variance * (prior mean/prior var + sqrt(a_t) x_t/beta_t)."""
    d = GaussianDiffusion(timesteps=100, schedule="linear")
    x0, xt = torch.tensor([[0.3]]), torch.tensor([[-0.5]])
    for t in range(1, 100, 7):  # code t >= 1 (paper t >= 2), where the prior has variance
        a, b, ab_prev = d.alphas[t].double(), d.betas[t].double(), d.alphas_cumprod_prev[t].double()
        variance = 1 / (1 / (1 - ab_prev) + a / b)
        mean = variance * (ab_prev.sqrt() * 0.3 / (1 - ab_prev) + a.sqrt() * -0.5 / b)
        got_mean, got_variance, got_log_variance = d.q_posterior_mean_variance(x0, xt, torch.tensor([t]))
        assert got_mean.item() == pytest.approx(mean.item(), rel=1e-4)
        assert got_variance.item() == pytest.approx(variance.item(), rel=1e-4)
        assert got_log_variance.item() == pytest.approx(math.log(variance.item()), rel=1e-4)


def test_posterior_log_variance_is_clipped_at_t0():
    d = GaussianDiffusion(timesteps=100)
    assert d.posterior_variance[0].item() == 0.0  # x_0 is known exactly given x_1 and x_0
    assert d.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(d.posterior_variance[1].item()))
    assert torch.isfinite(d.posterior_log_variance_clipped).all()


def test_predict_x0_from_eps_inverts_q_sample():
    """Eq. 15 undoes eq. 4 exactly when given the true noise."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=1000)
    x0, noise = torch.rand(8, 3, 4, 4) * 2 - 1, torch.randn(8, 3, 4, 4)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    x0_back = d.predict_x0_from_eps(d.q_sample(x0, t, noise), t, noise)
    assert torch.allclose(x0_back, x0, atol=2e-3)  # float32; the worst case is t = T-1, ab ~ 4e-5
    assert torch.allclose(x0_back[:6], x0[:6], atol=1e-5)


def test_both_forms_of_the_reverse_mean_agree():
    """Eq. 11, mu = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(a_t), equals the posterior mean of
    eq. 7 taken at x_0 = x^_0(x_t, eps) of eq. 15, which is how p_mean_variance computes it."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=100, schedule="cosine")
    xt, eps = torch.randn(6, 1, 3, 3), torch.randn(6, 1, 3, 3)
    t = torch.tensor([0, 1, 20, 50, 80, 99])
    model = lambda x, t_, y: eps
    mean = d.p_mean_variance(model, xt, t, clip_denoised=False)["mean"]
    b = d.betas[t].reshape(-1, 1, 1, 1)
    eq11 = (xt - b / d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1) * eps) / d.alphas[t].sqrt().reshape(-1, 1, 1, 1)
    assert torch.allclose(mean, eq11, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_clipping_puts_the_predicted_x0_in_range_and_the_mean_at_the_clipped_x0(prediction):
    """Clipping (the default; sample.py --no_clip turns it off): x^_0 is clipped to [-1, 1] before the
    posterior mean of eq. 7 is taken, and eps^ is recomputed from the clipped x^_0 (eq. 15 solved for
    eps). Without it, a network that says x_0 = 3 gets a mean built on 3."""
    d = GaussianDiffusion(timesteps=100, prediction=prediction)
    t, xt = torch.tensor([0, 10, 50, 99]), torch.randn(4, 1, 2, 2)
    x0_claimed = torch.full_like(xt, 3.0)
    ab = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eps_claimed = (xt - ab.sqrt() * x0_claimed) / (1 - ab).sqrt()
    output = {"eps": eps_claimed, "x0": x0_claimed, "v": ab.sqrt() * eps_claimed - (1 - ab).sqrt() * x0_claimed}[prediction]
    model = lambda x, t_, y: output  # noqa: E731
    mean_at = lambda x0: (d.posterior_mean_coef1[t].reshape(-1, 1, 1, 1) * x0  # noqa: E731  eq. 7
                          + d.posterior_mean_coef2[t].reshape(-1, 1, 1, 1) * xt)
    clipped = d.p_mean_variance(model, xt, t)
    assert torch.allclose(clipped["pred_x0"], torch.ones_like(xt))
    assert torch.allclose(clipped["mean"], mean_at(torch.ones_like(xt)), atol=1e-5)
    assert torch.allclose(clipped["eps"], (xt - ab.sqrt()) / (1 - ab).sqrt(), atol=1e-4)
    unclipped = d.p_mean_variance(model, xt, t, clip_denoised=False)
    assert torch.allclose(unclipped["pred_x0"], x0_claimed, atol=1e-3)
    assert torch.allclose(unclipped["mean"], mean_at(x0_claimed), atol=1e-3)


def test_the_beta_variance_samples_with_beta_t_and_the_posterior_variance_with_beta_tilde():
    """DDPM Sec. 3.2: sigma_t^2 = beta_t or beta~_t; p_mean_variance returns the one asked for, and its log."""
    t, xt = torch.tensor([0, 1, 50, 99]), torch.randn(4, 1, 2, 2)
    model = lambda x, t_, y: torch.zeros_like(x)  # noqa: E731
    for variance, expected in (("beta", "betas"), ("posterior", "posterior_variance")):
        d = GaussianDiffusion(timesteps=100, variance=variance)
        out = d.p_mean_variance(model, xt, t)
        assert torch.equal(out["variance"].flatten(1)[:, 0], getattr(d, expected)[t]), variance
    beta = GaussianDiffusion(timesteps=100, variance="beta").p_mean_variance(model, xt, t)
    assert torch.allclose(beta["log_variance"], beta["variance"].log())
    assert beta["variance"].flatten(1)[0, 0] == GaussianDiffusion(timesteps=100).betas[0] > 0  # not beta~_0 = 0


def test_training_loss_is_zero_for_a_model_that_knows_the_noise():
    """Algorithm 1 line 5: the loss measures the distance to the true eps, so an oracle scores 0."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=100)
    x0, noise, t = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randint(0, 100, (4,))
    oracle = lambda x, t_, y: noise
    for loss in ("l2", "l1", "huber", "vlb_l2"):
        d.loss = loss
        assert d.training_loss(oracle, x0, t=t, noise=noise)[0].mean().item() == 0.0
    # A network that always says 0 is off by eps itself; noise * 3 puts errors on both sides of Huber's
    # delta = 1 (quadratic below, linear above).
    zero = lambda x, t_, y: torch.zeros_like(x)
    e = 3 * noise
    expected = {"l2": e.pow(2), "l1": e.abs(), "huber": torch.where(e.abs() < 1, 0.5 * e.pow(2), e.abs() - 0.5)}
    assert (e.abs() < 1).any() and (e.abs() > 1).any()
    for loss, distance in expected.items():
        d.loss = loss
        per_image, _ = d.training_loss(zero, x0, t=t, noise=e)
        assert per_image.shape == (4,)  # one loss per image, averaged over its C*H*W values
        assert torch.allclose(per_image, distance.mean(dim=(1, 2, 3))), loss


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_vlb_l2_weights_are_eq_12_so_the_loss_is_the_bounds_term_up_to_one_constant(schedule, variance):
    """DDPM eq. 12: with a fixed sigma_t^2, the bound's term L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta)
    is, apart from a constant that does not depend on the network (eq. 8's C), the eps error weighted
    by beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)). So for a network that is wrong by a known
    amount, KL(wrong) - KL(exact) divided by the vlb_l2 loss is one number for every unclipped t (the
    median the weights were divided by); clipped t weigh exactly VLB_WEIGHT_CLIP; the median weight is 1."""
    from ddpm import VLB_WEIGHT_CLIP
    from improved_ddpm import vlb_terms
    torch.set_default_dtype(torch.float64)  # the KL difference is small next to the KL at large t
    try:
        T = 200
        d = GaussianDiffusion(timesteps=T, schedule=schedule, loss="vlb_l2", variance=variance)
        t = torch.arange(1, T)                                   # t = 0 is the decoder, not a KL term
        x0 = torch.rand(len(t), 1, 4, 4) * 2 - 1
        noise, error = torch.randn_like(x0), 0.01 * torch.randn_like(x0)
        xt = d.q_sample(x0, t, noise)
        bits = {}
        for name, eps in (("exact", noise), ("wrong", noise + error)):
            out = d.p_mean_variance(lambda x, t_, y: eps, xt, t, clip_denoised=False)
            bits[name] = vlb_terms(d, x0, xt, t, out)          # bits per dimension [T-1]
        kl_from_error = (bits["wrong"] - bits["exact"]) * math.log(2)  # nats per dimension
        loss = d.simple_loss(noise + error, x0, t, noise)          # vlb_weights[t] * mean squared error
        clipped = d.vlb_weights[t] == VLB_WEIGHT_CLIP
        ratio = kl_from_error[~clipped] / loss[~clipped]
        assert torch.allclose(ratio, ratio.median().expand_as(ratio), rtol=1e-4)
        assert clipped.sum() < 0.1 * T                          # the clip touches a few t, not most
        if variance == "posterior":
            assert d.vlb_weights[0] == VLB_WEIGHT_CLIP         # beta~_0 = 0: an infinite weight, clipped
        assert d.vlb_weights.median().item() == pytest.approx(1.0)
        # the same weights times the plain squared error: L_simple with eq. 12's weights
        assert torch.allclose(loss, d.vlb_weights[t] * error.pow(2).mean(dim=(1, 2, 3)))
    finally:
        torch.set_default_dtype(torch.float32)


def test_vlb_l2_needs_eps_prediction_and_no_second_weighting():
    with pytest.raises(UsageError, match="--loss vlb_l2.*--prediction eps"):
        GaussianDiffusion(loss="vlb_l2", prediction="v")
    with pytest.raises(UsageError, match="--loss vlb_l2"):
        GaussianDiffusion(loss="vlb_l2", min_snr_gamma=5)


def test_training_draws_t_uniformly_from_0_to_T_minus_1():
    d = GaussianDiffusion(timesteps=5)
    seen = []
    model = lambda x, t, y: (seen.append(t.clone()), torch.zeros_like(x))[1]
    torch.manual_seed(0)
    for _ in range(50):
        d.training_loss(model, torch.zeros(64, 1, 2, 2))
    counts = torch.bincount(torch.cat(seen), minlength=5)
    assert len(counts) == 5 and counts.min() > 500  # each of 0..4 about 640 times of 3200, nothing else


def test_sampler_visits_each_t_exactly_once_from_T_minus_1_to_0():
    """Algorithm 2 line 2 (for t = T, ..., 1), in code t = T-1, ..., 0: T network calls in order."""
    d = GaussianDiffusion(timesteps=25)
    calls = []
    def model(x, t, y):
        calls.append(t.tolist())
        return torch.zeros_like(x)
    out = d.sample(model, (3, 1, 4, 4), progress=False)
    assert [c[0] for c in calls] == list(range(24, -1, -1))
    assert all(len(set(c)) == 1 and len(c) == 3 for c in calls)
    assert out.shape == (3, 1, 4, 4)


def test_last_sampling_step_adds_no_noise():
    """Algorithm 2 line 3: z = 0 at paper t = 1 (code t = 0), so that step is deterministic,
    while every other step is random."""
    d = GaussianDiffusion(timesteps=10)
    model = lambda x, t, y: torch.zeros_like(x)
    x = torch.randn(2, 1, 4, 4)
    last = [d.p_sample(model, x, torch.zeros(2, dtype=torch.long))[0] for _ in range(2)]
    assert torch.equal(last[0], last[1])
    other = [d.p_sample(model, x, torch.full((2,), 5))[0] for _ in range(2)]
    assert not torch.equal(other[0], other[1])


def test_sampling_with_the_true_noise_recovers_a_single_training_image():
    """If the 'model' is the exact denoiser for a data set of one image x*, eps(x_t, t) =
    (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t), Algorithm 2 must return x* (each x^_0 is exactly x*)."""
    torch.manual_seed(0)
    d = GaussianDiffusion(timesteps=50)
    target = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    def exact(x, t, y):
        return (x - d.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1) * target) / d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    out, trajectory = d.sample(exact, (2, 3, 4, 4), trajectory_every=10, progress=False)
    assert torch.allclose(out, target.expand(2, -1, -1, -1), atol=1e-4)
    assert [step for step, _, _ in trajectory] == [49, 40, 30, 20, 10, 0]
    assert all(x0.shape == (2, 3, 4, 4) for _, _, x0 in trajectory)


def test_bad_schedule_settings_are_usage_errors():
    with pytest.raises(UsageError, match="--timesteps"):
        make_beta_schedule("linear", 1)
    with pytest.raises(UsageError, match="--schedule"):
        make_beta_schedule("quadratic", 100)
    with pytest.raises(UsageError, match="--loss"):
        GaussianDiffusion(loss="l3")


def test_config_rebuilds_the_same_diffusion():
    d = GaussianDiffusion(timesteps=123, schedule="cosine", loss="huber", variance="beta", prediction="v",
                          min_snr_gamma=5)
    again = GaussianDiffusion(**d.config())
    assert torch.equal(d.posterior_mean_coef1, again.posterior_mean_coef1) and again.config() == d.config()
    assert all(type(v) in (int, str, bool, float) for v in d.config().values())


def test_a_checkpoint_from_before_prediction_targets_still_loads():
    """Older checkpoints store only timesteps, schedule, loss and variance: the rest defaults to DDPM."""
    d = GaussianDiffusion(**dict(timesteps=50, schedule="linear", loss="l2", variance="posterior"))
    assert (d.prediction, d.learn_sigma, d.min_snr_gamma) == ("eps", False, 0.0)
