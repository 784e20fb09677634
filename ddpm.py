"""
ddpm.py: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020, arXiv 2006.11239).

One paper in one file. The forward process adds Gaussian noise to an image x_0 over T steps
until nothing is left of it (eqs. 2 and 4); a network eps_theta learns to predict the noise that
was added (Algorithm 1, the L_simple objective of eq. 14); sampling runs the process backwards
from pure noise, one step at a time (Algorithm 2).

THE TIMESTEP CONVENTION (the one place it is stated; tests/test_ddpm.py checks it):
    the paper counts t = 1 .. T; this code counts t = 0 .. T-1, so code t holds paper t + 1.
    betas[0] is the paper's beta_1, alphas_cumprod[T-1] is alpha_bar_T, and the sampler's last
    step (code t = 0, paper t = 1) adds no noise, as Algorithm 2 line 3 says.

Symbols (paper -> code), every tensor of shape [T], float32, indexed by code t:
    beta_t                      betas                             the schedule (Sec. 4, or IDDPM eq. 17)
    alpha_t = 1 - beta_t        alphas                            (eq. 4 text)
    alpha_bar_t = prod alpha_s  alphas_cumprod                    (eq. 4)
    alpha_bar_{t-1}             alphas_cumprod_prev               alphas_cumprod shifted, with 1 at t = 0
    sqrt(alpha_bar_t)           sqrt_alphas_cumprod               signal scale in q(x_t | x_0), eq. 4
    sqrt(1 - alpha_bar_t)       sqrt_one_minus_alphas_cumprod     noise scale in q(x_t | x_0), eq. 4
    1 / sqrt(alpha_bar_t)       sqrt_recip_alphas_cumprod         x_0 from eps, eq. 15
    sqrt(1/alpha_bar_t - 1)     sqrt_recipm1_alphas_cumprod       x_0 from eps, eq. 15
    beta~_t                     posterior_variance                q(x_{t-1} | x_t, x_0) variance, eq. 7
    log beta~_t (clipped)       posterior_log_variance_clipped    beta~ at t = 0 is 0; its log uses beta~ at t = 1
    x_0 coefficient of mu~_t    posterior_mean_coef1              eq. 7
    x_t coefficient of mu~_t    posterior_mean_coef2              eq. 7
    alpha_bar_t/(1-alpha_bar_t) snr                               signal-to-noise ratio SNR(t) (Min-SNR weighting)
    eq. 12's weight, clipped    vlb_weights                       per-t weight of --loss vlb_l2 (see there)

Tensor shapes: images x_0, x_t, eps are [B x C x H x W] in [-1, 1] (data scaled as in Sec. 3.3);
t and labels y are int64 [B].

Later papers reuse this file: ddim.py (a faster sampler) and improved_ddpm.py (learned variances,
the variational bound, respacing) build on GaussianDiffusion. Three options they need live here,
marked where they appear: what the network predicts (eps, x_0 or v), learned variances (Improved
DDPM eq. 15) and Min-SNR loss weighting. With their defaults this file is exactly Ho et al.
"""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import UsageError, tensors_to

SCHEDULES = ("linear", "cosine")
# Losses of Algorithm 1: distances between the network's output and its target ('l2' is L_simple,
# eq. 14), and 'vlb_l2', the squared error weighted per t as in the variational bound (eq. 12) with
# clipped weights. Then the two objectives built on the bound that improved_ddpm.py implements
# (Improved DDPM eq. 16 'hybrid', and the bound alone, 'kl').
SIMPLE_LOSSES = ("l2", "l1", "huber", "vlb_l2")
VLB_LOSSES = ("hybrid", "kl")
LOSSES = SIMPLE_LOSSES + VLB_LOSSES
# sigma_t^2 of the reverse step: beta~_t, beta_t (DDPM Sec. 3.2), or learned (Improved DDPM eq. 15).
VARIANCES = ("posterior", "beta", "learned")
# What the network predicts: the noise eps (DDPM), the clean image x_0, or v (Salimans & Ho 2022).
PREDICTIONS = ("eps", "x0", "v")
# --loss vlb_l2: eq. 12's weights are divided by their median over t (a typical t weighs 1, as in
# L_simple, so learning rates carry over) and clipped at this many times the median. Unclipped they run
# from 0.7 times the median (mid-range t) to infinity at t = 0 (sigma^2 = beta~ is 0 there), and reach
# 1e5 times the median at the cosine schedule's last step (beta_T = 0.999). The clip touches the first
# 12 of T = 1000 linear steps, and 42 of the cosine schedule's (both ends).
VLB_WEIGHT_CLIP = 10.0


# ---------------------------------------------------------------------------------------------
# Noise schedules
# ---------------------------------------------------------------------------------------------

def linear_beta_schedule(timesteps):
    """DDPM Sec. 4: beta rises linearly from 1e-4 to 0.02 over T = 1000 steps. For other T both ends
    are scaled by 1000 / T (as Improved DDPM does), so the total noise added, and therefore the
    terminal signal sqrt(alpha_bar_T), stays small for any T. Float64 [T]."""
    scale = 1000.0 / timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    return betas.clamp(max=0.999)  # for very small T the scaled end would pass 1: keep beta < 1


def cosine_beta_schedule(timesteps, s=0.008):
    """Improved DDPM eq. 17: alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
    and beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999 so the last steps do not
    divide by (nearly) zero. Noise is added more evenly than with the linear schedule. Float64 [T]."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64)                       # paper t = 0 .. T
    f = torch.cos(((steps / timesteps + s) / (1 + s)) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=0.999)


def make_beta_schedule(schedule, timesteps):
    if timesteps < 2:
        raise UsageError(f"--timesteps {timesteps}: need at least 2 diffusion steps (the paper uses 1000)")
    if schedule == "linear":
        return linear_beta_schedule(timesteps)
    if schedule == "cosine":
        return cosine_beta_schedule(timesteps)
    raise UsageError(f"--schedule {schedule}: unknown; choose one of {', '.join(SCHEDULES)}")


def extract(constant, t, ndim):
    """Pick constant[t] for each sample and shape it to broadcast over an image batch:
    constant [T], t int64 [B] -> [B x 1 x 1 x 1] (for ndim = 4)."""
    return constant[t].reshape(-1, *([1] * (ndim - 1)))


# ---------------------------------------------------------------------------------------------
# The diffusion: precomputed constants and the paper's formulas
# ---------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """The DDPM forward process, its posterior, Algorithm 1 (training loss) and Algorithm 2
    (ancestral sampling). Holds no network: every method that needs one takes a callable
    model(x_t, t, y) -> prediction [B x C x H x W] (or [B x 2C x H x W] with learned variances).

    Two later ideas are built in here because the sampler cannot work without them; each is marked
    where it appears:
      prediction = 'eps' | 'x0' | 'v'    what the network outputs (DDPM eq. 15; Salimans & Ho 2022)
      learn_sigma                        the network also outputs the variance (Improved DDPM eq. 15)
      min_snr_gamma                      the Min-SNR loss weighting (Hang et al. 2023), 0 = off
    The variational-bound losses ('hybrid', 'kl') and respacing live in improved_ddpm.py."""

    def __init__(self, timesteps=1000, schedule="linear", loss="l2", variance=None, prediction="eps",
                 learn_sigma=False, min_snr_gamma=0.0, **unknown):
        if unknown:  # GaussianDiffusion(**checkpoint["diffusion_config"]) of a newer version's (or edited) file
            raise UsageError(f"unknown diffusion settings: {sorted(unknown)} (a checkpoint written by a newer "
                             "version, or edited?)")
        if loss not in LOSSES:
            raise UsageError(f"--loss {loss}: unknown; choose one of {', '.join(LOSSES)}")
        if prediction not in PREDICTIONS:
            raise UsageError(f"--prediction {prediction}: unknown; choose one of {', '.join(PREDICTIONS)}")
        variance = variance or ("learned" if learn_sigma else "posterior")
        if variance not in VARIANCES:
            raise UsageError(f"variance {variance}: unknown; choose one of {', '.join(VARIANCES)}")
        if variance == "learned" and not learn_sigma:
            raise UsageError("--variance learned: this model does not output variances (it was not trained "
                             "with --learn_sigma); use posterior or beta")
        if learn_sigma and loss not in VLB_LOSSES:
            raise UsageError(f"--learn_sigma with --loss {loss}: the simple loss gives the variance output no "
                             "gradient; use --loss hybrid (Improved DDPM eq. 16) or --loss kl")
        if loss == "hybrid" and not learn_sigma:
            raise UsageError("--loss hybrid: its L_vlb part trains only the learned variances (Improved DDPM "
                             "eq. 16), so it needs --learn_sigma; without it, use l2 (the same objective)")
        if loss == "vlb_l2" and (prediction != "eps" or min_snr_gamma):
            raise UsageError("--loss vlb_l2: eq. 12 weighs the error of a predicted eps; use it with --prediction "
                             "eps and without --min_snr_gamma (one weighting at a time)")
        if min_snr_gamma < 0:
            raise UsageError(f"--min_snr_gamma {min_snr_gamma}: must be >= 0 (0 = off; the paper uses 5)")
        self.timesteps, self.schedule, self.loss, self.variance = timesteps, schedule, loss, variance
        self.prediction, self.learn_sigma, self.min_snr_gamma = prediction, learn_sigma, float(min_snr_gamma)
        self.set_betas(make_beta_schedule(schedule, timesteps))

    def set_betas(self, betas, timestep_map=None):
        """Precompute every constant from a float64 schedule betas [T'] (the constants table at the top).
        timestep_map [T'] says which t of the network's training each step is: the identity, except for
        a respaced diffusion (improved_ddpm.respace), whose step i is the network's t = timestep_map[i]."""
        # Computed in float64 (products of 1000 numbers near 1 lose digits in float32), stored in float32.
        alphas = 1.0 - betas                                                    # alpha_t (eq. 4 text)
        alphas_cumprod = torch.cumprod(alphas, dim=0)                           # alpha_bar_t (eq. 4)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        constants = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)             eq. 4
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            # x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)                 eq. 15
            #     = sqrt(1 / alpha_bar_t) x_t - sqrt(1 / alpha_bar_t - 1) eps
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
            # beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t                 eq. 7
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            # mu~_t = coef1 x_0 + coef2 x_t                                                eq. 7
            # coef1 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
            # coef2 = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            # SNR(t) = alpha_bar_t / (1 - alpha_bar_t): signal-to-noise ratio of x_t (Min-SNR, Hang et al.)
            snr=alphas_cumprod / (1.0 - alphas_cumprod),
        )
        # The weight of the eps error in the bound's term L_{t-1} (eq. 12), with the fixed reverse variance
        # sigma_t^2 this diffusion samples with (beta~_t or beta_t, Sec. 3.2):
        #     beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t))
        # L_simple (eq. 14) is this bound with every weight set to 1; --loss vlb_l2 keeps the weights,
        # scaled so their median is 1 and clipped at VLB_WEIGHT_CLIP: unclipped, t = 0 (beta~ = 0) and
        # the cosine schedule's last steps would dominate every batch.
        sigma2 = betas if self.variance == "beta" else constants["posterior_variance"]
        eq12_weights = betas ** 2 / (2.0 * sigma2 * alphas * (1.0 - alphas_cumprod))   # inf where sigma2 = 0
        constants["vlb_weights"] = (eq12_weights / eq12_weights.median()).clamp(max=VLB_WEIGHT_CLIP)
        # beta~ is 0 at t = 0 (x_0 is then known exactly), so its log would be -inf: use beta~ of
        # the next step there, as Improved DDPM's code does. Only used where a log-variance is needed.
        # A one-step schedule (respaced to --steps 1) has no next step: beta_0, the upper bound, stands in.
        next_variance = constants["posterior_variance"][1:2] if len(betas) > 1 else betas[:1]
        variance_for_log = torch.cat([next_variance, constants["posterior_variance"][1:]])
        constants["posterior_log_variance_clipped"] = variance_for_log.log()
        for name, value in constants.items():
            setattr(self, name, value.float())
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else timestep_map.long()
        return self  # on the CPU; .to(device) moves it

    def config(self):
        """The plain dict a checkpoint stores; GaussianDiffusion(**config) rebuilds this object."""
        return dict(timesteps=self.timesteps, schedule=self.schedule, loss=self.loss, variance=self.variance,
                    prediction=self.prediction, learn_sigma=self.learn_sigma, min_snr_gamma=self.min_snr_gamma)

    def to(self, device):
        """Move every constant to device (the constants are plain tensor attributes)."""
        return tensors_to(self, device)

    def describe(self):
        """One line for start-up: T, the beta range and the terminal signal sqrt(alpha_bar_T),
        which must be near 0 so that x_T is (almost) pure noise, matching the prior N(0, I)."""
        steps = len(self.betas)
        respaced = f" (respaced to {steps} steps)" if steps != self.timesteps else ""
        return (f"diffusion: T={self.timesteps}{respaced} {self.schedule} schedule, beta from "
                f"{self.betas[0].item():.2e} to {self.betas[-1].item():.3g}, sqrt(alpha_bar_T)="
                f"{self.sqrt_alphas_cumprod[-1].item():.2e}, predicts {self.prediction}, loss {self.loss}, "
                f"variance {self.variance}" + (f", min-SNR gamma {self.min_snr_gamma:g}" if self.min_snr_gamma else ""))

    # --- the forward process -------------------------------------------------------------------

    def q_sample(self, x0, t, noise):
        """Sample x_t ~ q(x_t | x_0) in one shot (eq. 4, reparameterised as in Sec. 3.2):
        x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.   x0, noise [B x C x H x W], t [B]."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior_mean_variance(self, x0, xt, t):
        """The forward-process posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)  (eqs. 6-7).
        Returns mu~_t [B x C x H x W], beta~_t and log beta~_t (clipped), each [B x 1 x 1 x 1]."""
        mean = (extract(self.posterior_mean_coef1, t, xt.ndim) * x0
                + extract(self.posterior_mean_coef2, t, xt.ndim) * xt)
        return (mean, extract(self.posterior_variance, t, xt.ndim),
                extract(self.posterior_log_variance_clipped, t, xt.ndim))

    # --- prediction targets: eps, x_0 and v are three views of one quantity ----------------------
    # Given x_t, knowing any one of eps, x_0 or v fixes the other two (eq. 4 is one linear equation).
    # Write a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t), so a^2 + s^2 = 1 and x_t = a x_0 + s eps.

    def predict_x0_from_eps(self, xt, t, eps):
        """Invert eq. 4 for x_0 given the noise (eq. 15): x^_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
                - extract(self.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)

    def predict_eps_from_x0(self, xt, t, x0):
        """Invert eq. 4 for the noise given x_0: eps = (x_t - a x_0) / s = (x_t / a - x_0) / sqrt(1/alpha_bar_t - 1)."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, xt.ndim))

    def v_target(self, x0, t, eps):
        """v := a eps - s x_0 (Salimans & Ho 2022, Progressive Distillation; section unverified).
        Its variance is alpha_bar + (1 - alpha_bar) Var(x_0): 1 at every t for unit-variance data (less
        for images in [-1, 1]), and unlike eps it stays informative at high noise."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * eps
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def predict_x0_from_v(self, xt, t, v):
        """x_0 = a x_t - s v (Salimans & Ho 2022): substitute x_t = a x_0 + s eps and use a^2 + s^2 = 1."""
        return (extract(self.sqrt_alphas_cumprod, t, xt.ndim) * xt
                - extract(self.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v)

    def predict_eps_from_v(self, xt, t, v):
        """eps = s x_t + a v (Salimans & Ho 2022), by the same substitution."""
        return (extract(self.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * xt
                + extract(self.sqrt_alphas_cumprod, t, xt.ndim) * v)

    # --- the reverse process -------------------------------------------------------------------

    def model_output(self, model, xt, t, y=None):
        """Call the network. t indexes this diffusion's steps; timestep_map turns it into the t the
        network was trained with (they differ only for a respaced diffusion). [B x C(or 2C) x H x W]."""
        return model(xt, self.timestep_map[t], y)

    def split_output(self, output, channels):
        """With learn_sigma the network outputs 2C channels: the prediction, then the variance values v
        of Improved DDPM eq. 15. Returns (prediction [B x C x H x W], v [B x C x H x W] or None)."""
        if self.learn_sigma:
            return output[:, :channels], output[:, channels:]
        return output, None

    def predictions(self, xt, t, prediction, clip_denoised=True):
        """(x^_0, eps^) from the network's prediction, whichever of eps, x_0, v it predicts. With clipping,
        x^_0 is clipped to the data range [-1, 1] (Ho et al.'s code does this) and eps^ recomputed from the
        clipped x^_0, so the pair stays consistent with x_t (DDIM's update relies on that)."""
        if self.prediction == "eps":
            eps = prediction
            pred_x0 = self.predict_x0_from_eps(xt, t, eps)                     # eq. 15
        elif self.prediction == "x0":
            pred_x0 = prediction
            eps = self.predict_eps_from_x0(xt, t, pred_x0)
        else:
            pred_x0 = self.predict_x0_from_v(xt, t, prediction)
            eps = self.predict_eps_from_v(xt, t, prediction)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(xt, t, pred_x0)
        return pred_x0, eps

    def p_mean_variance(self, model, xt, t, y=None, clip_denoised=True, output=None):
        """The learned reverse step p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I)  (eq. 1).

        mu_theta is eq. 11, mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t),
        computed the equivalent way: predict x^_0 (eq. 15), then take the posterior mean
        mu~_t(x_t, x^_0) (eq. 7). The detour lets x^_0 be clipped to [-1, 1] first, which keeps an
        imperfect model's samples in range, and serves x_0- and v-predicting networks unchanged.
        sigma_t^2 is beta~_t ('posterior') or beta_t ('beta'), Sec. 3.2 reports similar results; or
        'learned', Improved DDPM eq. 15. output: the network's output if already computed (the hybrid
        loss passes one whose mean half is detached). Returns dict(mean, variance, log_variance, pred_x0, eps)."""
        if output is None:
            output = self.model_output(model, xt, t, y)
        prediction, v = self.split_output(output, xt.shape[1])
        pred_x0, eps = self.predictions(xt, t, prediction, clip_denoised)
        mean, posterior_variance, posterior_log_variance = self.q_posterior_mean_variance(pred_x0, xt, t)
        if self.variance == "learned":
            # Improved DDPM eq. 15: Sigma = exp(v log beta_t + (1 - v) log beta~_t), per dimension. The
            # network's raw output lies around [-1, 1]; like the authors' code we map it to v = (out + 1) / 2.
            # Interpolating the logs, not the variances, matters (a real bug in one library).
            frac = (v.float() + 1.0) / 2.0
            log_variance = (frac * extract(self.betas, t, xt.ndim).log()
                            + (1.0 - frac) * extract(self.posterior_log_variance_clipped, t, xt.ndim))
            variance = log_variance.exp()
        elif self.variance == "posterior":
            variance, log_variance = posterior_variance, posterior_log_variance
        else:  # at t = 0 this is beta_0 itself; Ho et al.'s code puts the next step's beta~ there (its
            # posterior_variance[1]). That changes the decoder term of the bound (nll_bits_per_dim) and the
            # size of classifier guidance's last shift (Sigma * s * grad), but adds no noise: none is
            # added at t = 0
            variance = extract(self.betas, t, xt.ndim)
            log_variance = variance.log()
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0, eps=eps)

    # --- Algorithm 1 ---------------------------------------------------------------------------

    def prediction_target(self, x0, t, noise):
        """What the network should output at x_t: eps (DDPM), x_0, or v (Salimans & Ho 2022)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.v_target(x0, t, noise)

    def min_snr_weight(self, t):
        """Min-SNR-gamma weighting (Hang et al. 2023, Sec. 3.4): weigh each t's x_0-error by
        min(SNR(t), gamma), so that the many nearly-clean steps (huge SNR) stop dominating. The same
        weight written for the loss actually computed: / SNR for eps, / (SNR + 1) for v (the
        authors' code; not min(SNR + 1, gamma) / (SNR + 1)). 1 when gamma = 0 (off). [B]."""
        if not self.min_snr_gamma:
            return torch.ones(t.shape, device=t.device)
        snr, gamma = self.snr[t], self.min_snr_gamma
        if self.prediction == "eps":
            return (gamma / snr).clamp(max=1.0)              # min(SNR, gamma) / SNR, safe where SNR -> 0
        if self.prediction == "x0":
            return snr.clamp(max=gamma)                      # min(SNR, gamma)
        return snr.clamp(max=gamma) / (snr + 1.0)            # min(SNR, gamma) / (SNR + 1)

    def simple_loss(self, prediction, x0, t, noise):
        """The distance between prediction and target, averaged over each image: [B]. With eps, 'l2'
        and no weighting this is L_simple (eq. 14); 'vlb_l2' weighs it per t as eq. 12 does (vlb_weights)."""
        target = self.prediction_target(x0, t, noise)
        prediction = prediction.float()
        if self.loss == "l1":
            distance = F.l1_loss(prediction, target, reduction="none")
        elif self.loss == "huber":
            distance = F.smooth_l1_loss(prediction, target, reduction="none")      # Huber with delta = 1
        else:
            distance = F.mse_loss(prediction, target, reduction="none")            # the hybrid's L_simple too
        distance = distance.mean(dim=tuple(range(1, x0.ndim)))                    # [B]
        if self.loss == "vlb_l2":
            distance = distance * self.vlb_weights[t]                              # eq. 12's weight, clipped
        return distance * self.min_snr_weight(t)

    def training_loss(self, model, x0, y=None, t=None, noise=None):
        """Algorithm 1 (Training), one step's loss:
            2: x_0 ~ q(x_0)                  (the batch x0, given)
            3: t ~ Uniform({1, ..., T})      (code: t uniform on {0, ..., T-1})
            4: eps ~ N(0, I)
            5: gradient descent step on || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
        The squared error is L_simple (eq. 14); 'l1' and 'huber' swap the distance; x0- or v-prediction
        swap the target; min_snr_gamma weighs each t. t (for example importance-sampled, improved_ddpm.py)
        and noise may be passed in instead of drawn. The 'hybrid' and 'kl' losses are
        improved_ddpm.training_loss. Returns (per-image losses [B], t [B]); the step uses their mean."""
        if self.loss in VLB_LOSSES:
            raise ValueError(f"loss {self.loss} is improved_ddpm.training_loss, not Algorithm 1")
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.timesteps, (b,), device=x0.device)   # line 3
        if noise is None:
            noise = torch.randn_like(x0)                                   # line 4
        xt = self.q_sample(x0, t, noise)                                   # the argument in line 5 (eq. 4)
        prediction = self.model_output(model, xt, t, y)
        return self.simple_loss(prediction, x0, t, noise), t               # line 5 / eq. 14

    # --- Algorithm 2 ---------------------------------------------------------------------------

    @torch.no_grad()
    def p_sample(self, model, xt, t, y=None, clip_denoised=True, cond_fn=None):
        """Algorithm 2 lines 3-4, one reverse step from x_t to x_{t-1}:
            3: z ~ N(0, I) if t > 1, else z = 0          (code: t > 0)
            4: x_{t-1} = mu_theta(x_t, t) + sigma_t z
        cond_fn(x_t, t, y) -> s * grad log p(y | x_t) turns this into classifier guidance (guidance.py;
        Dhariwal & Nichol 2021, ADM Alg. 1, arXiv eq. 10): the mean moves to mu + Sigma * s * grad.
        Returns (x_{t-1}, predicted x_0)."""
        out = self.p_mean_variance(model, xt, t, y, clip_denoised)
        mean = out["mean"]
        if cond_fn is not None:  # ADM Alg. 1's shifted mean; the classifier sees the network's own t
            mean = mean + out["variance"] * cond_fn(xt, self.timestep_map[t], y)
        z = torch.randn_like(xt)
        nonzero = (t > 0).float().reshape(-1, *([1] * (xt.ndim - 1)))       # no noise at the last step
        return mean + nonzero * (0.5 * out["log_variance"]).exp() * z, out["pred_x0"]

    @torch.no_grad()
    def sample(self, model, shape, y=None, noise=None, clip_denoised=True, trajectory_every=0, progress=True,
               cond_fn=None):
        """Algorithm 2 (Sampling):
            1: x_T ~ N(0, I)
            2: for t = T, ..., 1 do          (code: t = T-1, ..., 0: each visited exactly once)
            3-4: x_{t-1} = mu_theta(x_t, t) + sigma_t z      (p_sample)
            6: return x_0
        On a respaced diffusion (improved_ddpm.respace) the loop runs over its fewer steps. cond_fn: see
        p_sample (classifier guidance).
        shape: (B, C, H, W); y: int64 [B] labels or None; noise: x_T to start from (else drawn).
        With trajectory_every = k > 0 also returns [(t, x after the step at t, predicted x_0 at t)] for
        the first step and every k-th (on the CPU), for GIFs of the reverse process. Returns x_0
        [B x C x H x W] in [-1, 1] (or (x_0, trajectory))."""
        device = self.betas.device
        steps = len(self.betas)
        x = noise.to(device) if noise is not None else torch.randn(shape, device=device)
        trajectory = []
        for step in tqdm(reversed(range(steps)), total=steps, desc="sampling", disable=not progress, leave=False):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            x, pred_x0 = self.p_sample(model, x, t, y, clip_denoised, cond_fn)
            if trajectory_every and (step % trajectory_every == 0 or step == steps - 1):
                trajectory.append((step, x.cpu(), pred_x0.cpu()))
        return (x, trajectory) if trajectory_every else x
