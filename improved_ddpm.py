"""
improved_ddpm.py: Improved Denoising Diffusion Probabilistic Models (Nichol & Dhariwal 2021, arXiv 2102.09672).

DDPM trains on L_simple, which ignores the variational bound's weighting and fixes the reverse
variance; its log-likelihoods lag behind other likelihood models. Improved DDPM:
  - learns the reverse variances (eq. 15; the interpolation itself is in ddpm.py's p_mean_variance,
    because every sampler needs it),
  - trains them with the variational bound L_vlb, built here from Gaussian KL terms and the
    discretised decoder of DDPM eq. 13, in the hybrid objective L_simple + lambda L_vlb (eq. 16),
  - samples t by importance, in proportion to each t's recent loss (for pure L_vlb training),
  - samples with fewer steps by respacing the schedule (eq. 19), which works best with learned
    variances because the variance of a long jump is neither beta nor beta~,
  - and reports the negative log-likelihood in bits per dimension (nll_bits_per_dim, tools/nll.py).
(The cosine schedule, eq. 17, is in ddpm.py.) The paper's text was not at hand when this was
written: equation numbers 15-17 and 19 are confirmed by secondary sources, and so is Sec. 3.1 (learned
variances); the other section numbers are unconfirmed and not used here.

The bound (DDPM eq. 5), with code t = 0 .. T-1 standing for paper t = 1 .. T (ddpm.py):
    L_vlb = L_T + sum_{t>=1} L_{t-1},   in code terms: prior + sum over code t of term(t), where
    prior    = KL(q(x_T | x_0) || N(0, I))                            no parameters
    term(t)  = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))    code t >= 1 (paper L_{t-1}, t >= 2)
    term(0)  = -log p_theta(x_0 | x_1)                                the decoder, DDPM eq. 13
All in bits per dimension: nats averaged over the C*H*W values of an image, divided by ln 2.

Tensor shapes: x0, x_t [B x C x H x W] in [-1, 1]; t int64 [B]; per-image results [B].
"""
import math

import torch
from tqdm import tqdm

from ddim import SPACINGS, ddim_timesteps
from ddpm import GaussianDiffusion, extract, make_beta_schedule
from utils import UsageError

LAMBDA_VLB = 0.001   # lambda in eq. 16: small, so L_vlb steers the variances without swamping L_simple
TIMESTEP_SAMPLERS = ("uniform", "loss-aware")


def mean_over_dims(x):
    """[B x C x H x W] -> [B]: the per-image average, so results are per dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------
# The pieces of the bound
# ---------------------------------------------------------------------------------------------

def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, var1) || N(mean2, var2)) for each element, in nats (the closed form for two
    Gaussians): 0.5 (log var2 - log var1 + var1 / var2 + (mean1 - mean2)^2 / var2 - 1).
    Zero exactly when the two agree, positive otherwise. Shapes broadcast."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def discretized_gaussian_log_likelihood(x0, mean, log_variance):
    """log p_theta(x_0 | x_1) for each element, in nats: DDPM eq. 13, the discretised decoder.
    Pixel values are 256 levels scaled to [-1, 1], so each level owns a bin of width 2/255 around it:
        p = integral over [x - 1/255, x + 1/255] of N(mu, sigma^2),
    with the outermost bins stretched to -inf (for x = -1) and +inf (for x = 1), so the probabilities
    of the 256 levels sum to exactly 1 and the result is a true discrete likelihood.
    x0 [B x C x H x W] on the 256-level grid; mean, log_variance broadcastable to it."""
    inv_std = torch.exp(-0.5 * log_variance)
    upper = (x0 - mean + 1.0 / 255) * inv_std        # standardised bin edges
    lower = (x0 - mean - 1.0 / 255) * inv_std
    cdf_upper = torch.special.ndtr(upper)
    cdf_lower = torch.special.ndtr(lower)
    # Phi(upper) - Phi(lower) loses every digit when both are near 1; the mirror image is exact there.
    middle = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper), cdf_upper - cdf_lower)
    probability = torch.where(x0 < -0.999, cdf_upper,                    # bin (-inf, -1 + 1/255]
                              torch.where(x0 > 0.999, torch.special.ndtr(-lower), middle))  # [1 - 1/255, inf)
    return probability.clamp(min=1e-12).log()


def vlb_terms(diffusion, x0, xt, t, out):
    """The bound's term at each image's t, in bits per dimension [B] (see the table at the top):
    the Gaussian KL between the true posterior q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7) and the model's
    p_theta(x_{t-1} | x_t) for t >= 1, the decoder's -log p_theta(x_0 | x_1) (DDPM eq. 13) for t = 0.
    out: the model's reverse step, GaussianDiffusion.p_mean_variance's dict."""
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x0, xt, t)
    kl = mean_over_dims(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2)
    decoder_nll = -mean_over_dims(discretized_gaussian_log_likelihood(
        x0, out["mean"], out["log_variance"])) / math.log(2)
    return torch.where(t == 0, decoder_nll, kl)


def prior_bits_per_dim(diffusion, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) (DDPM eq. 5, first term), bits per dimension [B]. It has no
    parameters; it says how far x_T still is from pure noise, about 1e-5 bits/dim for T = 1000."""
    t = torch.full((x0.shape[0],), diffusion.timesteps - 1, device=x0.device, dtype=torch.long)
    mean = extract(diffusion.sqrt_alphas_cumprod, t, x0.ndim) * x0                        # eq. 4
    log_variance = extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0.ndim).pow(2).log()
    zero = torch.zeros_like(log_variance)
    return mean_over_dims(normal_kl(mean, log_variance, zero, zero)) / math.log(2)


# ---------------------------------------------------------------------------------------------
# Training on the bound: the hybrid objective (eq. 16) and L_vlb alone
# ---------------------------------------------------------------------------------------------

def training_loss(diffusion, model, x0, y=None, t=None, noise=None):
    """The per-image loss for diffusion.loss = 'hybrid' or 'kl' (the other losses are Algorithm 1,
    GaussianDiffusion.training_loss in ddpm.py).

    L_vlb = sum over all T terms; one image at one uniformly drawn t estimates it by T * term(t).
        'hybrid'  L_simple + lambda L_vlb, lambda = 0.001                                    (eq. 16)
                  The L_vlb part sees the network's mean prediction through a stop-gradient, so
                  L_simple alone trains the mean and L_vlb alone trains the variances (learn_sigma).
        'kl'      L_vlb alone, gradient to everything. Noisier; pair it with --timestep_sampler
                  loss-aware, which the paper introduced for exactly this.
    With L_vlb in bits per dimension, the logged 'kl' loss is itself an estimate of the model's
    bound in bits/dim (without the tiny prior term). Returns (per-image losses [B], t [B])."""
    if diffusion.loss not in ("hybrid", "kl"):
        raise ValueError(f"loss {diffusion.loss} is Algorithm 1: GaussianDiffusion.training_loss")
    if t is None:
        t = torch.randint(0, diffusion.timesteps, (x0.shape[0],), device=x0.device)   # Alg. 1 line 3
    if noise is None:
        noise = torch.randn_like(x0)                                                  # Alg. 1 line 4
    xt = diffusion.q_sample(x0, t, noise)                                             # eq. 4
    output = diffusion.model_output(model, xt, t, y).float()  # [B x 2C x H x W] with learned variances
    prediction, v = diffusion.split_output(output, x0.shape[1])
    if diffusion.loss == "hybrid":
        frozen_mean = torch.cat([prediction.detach(), v], dim=1) if v is not None else output.detach()
        out = diffusion.p_mean_variance(None, xt, t, clip_denoised=False, output=frozen_mean)
        vlb = diffusion.timesteps * vlb_terms(diffusion, x0, xt, t, out)
        return diffusion.simple_loss(prediction, x0, t, noise) + LAMBDA_VLB * vlb, t   # eq. 16
    out = diffusion.p_mean_variance(None, xt, t, clip_denoised=False, output=output)
    return diffusion.timesteps * vlb_terms(diffusion, x0, xt, t, out), t


class TimestepSampler:
    """Which t each image trains on, and the weight that keeps the loss unbiased.

    uniform:     t ~ Uniform{0 .. T-1}, weight 1 (Algorithm 1 line 3).
    loss-aware:  Improved DDPM's importance sampling (its section and equation numbers unconfirmed):
                 p_t proportional to sqrt(E[L_t^2]), the root-mean-square of the last 10 losses seen
                 at t, mixed with a little uniform so no t is starved; weight 1 / (T p_t), so that
                 E_{t~p}[weight * L_t] = E_{t~uniform}[L_t]. The few t with huge, noisy losses (near
                 t = 0 for L_vlb) are sampled often and weighed down, cutting the gradient noise.
                 Uniform until every t has its 10 losses.
    t_range = (t_min, t_max): only t in {t_min, ..., t_max} (inclusive) are drawn, uniformly or by loss,
    and the weights keep the loss unbiased for the uniform draw on that interval: an expert denoiser
    of eDiff-I (experts.py). Default: all of 0 .. T-1.
    state_dict() goes into the full checkpoint, so resuming keeps the history."""

    def __init__(self, timesteps, kind="uniform", history=10, uniform_prob=0.001, t_range=None):
        if kind not in TIMESTEP_SAMPLERS:
            raise ValueError(f"timestep sampler {kind}: choose one of {', '.join(TIMESTEP_SAMPLERS)}")
        self.timesteps, self.kind, self.uniform_prob = timesteps, kind, uniform_prob
        t_min, t_max = t_range if t_range is not None else (0, timesteps - 1)
        if not 0 <= t_min <= t_max < timesteps:
            raise UsageError(f"--t_min {t_min} --t_max {t_max}: need 0 <= t_min <= t_max <= T-1 = {timesteps - 1}")
        self.allowed = torch.zeros(timesteps, dtype=torch.bool)                    # [T], the interval
        self.allowed[t_min:t_max + 1] = True
        self.loss_history = torch.zeros(timesteps, history, dtype=torch.float64)   # [T x 10], newest last
        self.loss_counts = torch.zeros(timesteps, dtype=torch.long)                # [T], saturates at 10

    def probabilities(self):
        """p_t [T], summing to 1 (0 outside the interval)."""
        uniform = self.allowed.double() / self.allowed.sum()
        full = self.loss_counts[self.allowed] == self.loss_history.shape[1]
        if self.kind == "uniform" or not bool(full.all()):
            return uniform
        rms = self.loss_history.pow(2).mean(dim=1).sqrt() * self.allowed
        return (1 - self.uniform_prob) * rms / rms.sum() + self.uniform_prob * uniform

    def sample(self, batch_size, device, generator=None):
        """(t int64 [B], weights float32 [B]) on device; generator (on device) makes the draw repeatable.
        weight = 1 / (n p_t) with n the interval's length: E_{t~p}[weight L_t] = the uniform mean."""
        p = self.probabilities().to(device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (int(self.allowed.sum()) * p[t])
        return t, weights.float()

    def update(self, t, losses):
        """Record each image's loss at its t (only the loss-aware sampler keeps a history)."""
        if self.kind == "uniform":
            return
        for step, loss in zip(t.tolist(), losses.detach().float().cpu().tolist()):
            if not math.isfinite(loss):  # a step train.py skips: one inf or NaN would make every p_t NaN
                continue
            self.loss_history[step] = torch.roll(self.loss_history[step], -1)
            self.loss_history[step, -1] = loss
            self.loss_counts[step] = min(self.loss_counts[step] + 1, self.loss_history.shape[1])

    def state_dict(self):
        return dict(kind=self.kind, loss_history=self.loss_history.clone(), loss_counts=self.loss_counts.clone())

    def load_state_dict(self, state):
        self.loss_history.copy_(state["loss_history"])
        self.loss_counts.copy_(state["loss_counts"])


# ---------------------------------------------------------------------------------------------
# Respacing: sampling with fewer steps (eq. 19, second-hand; the section number is unconfirmed)
# ---------------------------------------------------------------------------------------------

def respace(diffusion, steps, spacing="uniform"):
    """A diffusion over S = steps of the T training steps, tau_0 < ... < tau_{S-1} (the same sub-sequence
    as DDIM, ddim.ddim_timesteps), that the trained network can sample with unchanged:
        alpha_bar of the new step i is alpha_bar_{tau_i}          (the marginals q(x_t | x_0) are kept)
        beta_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}    (eq. 19; alpha_bar before tau_0 is 1)
    and every other constant (beta~, the posterior coefficients) follows from these betas as in DDPM.
    With S = T, tau is every step and the betas are the original ones. The network is still called
    with its own t = tau_i (timestep_map), and learned variances interpolate between the new beta_i
    and beta~_i, which is why they suit respacing. Use with GaussianDiffusion.sample (Algorithm 2)."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing}: choose one of {', '.join(SPACINGS)}")
    tau = ddim_timesteps(diffusion.timesteps, steps, spacing)
    alphas_cumprod = torch.cumprod(1.0 - make_beta_schedule(diffusion.schedule, diffusion.timesteps), 0)  # float64
    kept = alphas_cumprod[tau]
    kept_prev = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
    betas = 1.0 - kept / kept_prev                                                    # eq. 19
    spaced = GaussianDiffusion(**diffusion.config()).set_betas(betas, timestep_map=tau)
    return spaced.to(diffusion.betas.device)


# ---------------------------------------------------------------------------------------------
# Negative log-likelihood in bits per dimension (what the paper's likelihood tables report)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def nll_bits_per_dim(diffusion, model, x0, y=None, clip_denoised=True, progress=False):
    """The variational bound L_vlb on -log p_theta(x_0) for each image, in bits per dimension, with
    every one of the T terms evaluated (one x_t sample each, as the authors' code does): T network
    calls per batch. Any model gives an upper bound on its own NLL; lower is better. x0 must lie on
    the 256-level grid (images loaded from files do). Returns dict of [B] tensors: total, prior
    (L_T), decoder (-log p(x_0 | x_1)), and terms [B x T] (term(t) for each code t)."""
    b = x0.shape[0]
    terms = torch.zeros(b, diffusion.timesteps, device=x0.device)
    for step in tqdm(reversed(range(diffusion.timesteps)), total=diffusion.timesteps, desc="bound terms",
                     disable=not progress, leave=False):
        t = torch.full((b,), step, device=x0.device, dtype=torch.long)
        xt = diffusion.q_sample(x0, t, torch.randn_like(x0))                           # eq. 4
        out = diffusion.p_mean_variance(model, xt, t, y, clip_denoised)
        terms[:, step] = vlb_terms(diffusion, x0, xt, t, out)
    prior = prior_bits_per_dim(diffusion, x0)
    return dict(total=terms.sum(dim=1) + prior, prior=prior, decoder=terms[:, 0], terms=terms)
