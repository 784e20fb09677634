"""
ddim.py: Denoising Diffusion Implicit Models (Song, Meng, Ermon 2020, arXiv 2010.02502).

DDIM keeps the network and the training of ddpm.py unchanged (same eps_theta, same L_simple) and
changes only the sampler. Its forward process is non-Markovian, which gives a family of reverse
updates indexed by sigma_t (eq. 12); eta scales sigma_t (eq. 16):
    eta = 1   the DDPM posterior variance: an ancestral sampler like Algorithm 2
    eta = 0   no noise at all: x_T determines x_0, a discretised ODE that can also be run forwards
              (inversion: an image -> its x_T) and whose x_T space can be interpolated.
Because the update only needs alpha_bar at two steps, it may jump along any increasing sub-sequence
tau of the T training steps: S steps instead of T, exactly S network calls.

NOTATION TRAP: the DDIM paper writes alpha_t for what DDPM (and this code) calls alpha_bar_t, the
cumulative product. Every formula below is written with alpha_bar.

Timesteps follow ddpm.py: code t = 0 .. T-1 is paper t = 1 .. T. A step from tau_i to tau_{i-1} uses
alpha_bar at both; after the last sampled step (tau_0) the "previous" alpha_bar is 1 (paper's
alpha_bar_0 = 1): the result is the predicted x_0 itself.

Tensor shapes: x, noise [B x C x H x W] in [-1, 1]; labels y int64 [B] or None.
"""
import torch
from tqdm import tqdm

from utils import UsageError

SPACINGS = ("uniform", "quadratic")


def ddim_timesteps(timesteps, steps, spacing="uniform"):
    """The sub-sequence tau of S = steps training steps, increasing, distinct, int64 [S]: DDIM's tau
    (its section number is not confirmed here).

    uniform:   evenly spaced from 0 to T-1, rounded. (The authors' code strides by T // S from 0, which
               never reaches T-1, so it would start sampling from a slightly noisy-but-not-pure x; we
               always include T-1, where x_T ~ N(0, I) holds, and 0, the least noisy step.)
    quadratic: tau_i proportional to i^2, dense near t = 0 where the image's fine detail forms; the
               paper's choice for CIFAR-10. (The authors' code squares linspace(0, sqrt(0.8 T), S),
               stopping at 0.8 T; we stretch it to T-1 for the reason above.) Rounding can make the
               first few equal; each is then pushed one past its predecessor so S steps stay S steps.
    With S = T both give every step 0 .. T-1."""
    if not 1 <= steps <= timesteps:
        raise UsageError(f"--steps {steps}: must be between 1 and the model's T = {timesteps}")
    if steps == 1:
        return torch.tensor([timesteps - 1])
    fraction = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spacing == "uniform":
        tau = (fraction * (timesteps - 1)).round().long()
    elif spacing == "quadratic":
        tau = (fraction ** 2 * (timesteps - 1)).round().long()
        for i in range(1, steps):  # make it strictly increasing (it can only collide at the start)
            tau[i] = max(tau[i], tau[i - 1] + 1)
    else:
        raise UsageError(f"--spacing {spacing}: unknown; choose one of {', '.join(SPACINGS)}")
    return tau


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta):
    """DDIM eq. 16: sigma_t(eta) = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_prev),
    where prev is the previous step *of the sub-sequence*. With consecutive steps and eta = 1 this is
    sqrt(beta~_t), DDPM's posterior standard deviation (eq. 7)."""
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()


def check_eta(eta):
    """eta runs from 0 (deterministic DDIM) to 1 (DDPM's posterior variance, eq. 16). Above 1, sigma_t^2
    can pass 1 - alpha_bar_prev (S = 50 of T = 1000, linear: from eta = 1.008, on the step into tau_0),
    and eq. 12's "direction pointing to x_t", sqrt(1 - alpha_bar_prev - sigma_t^2), has no real value."""
    if not 0 <= eta <= 1:
        raise UsageError(f"--eta {eta:g}: must be between 0 (deterministic DDIM) and 1 (DDPM's variance, eq. 16)")


@torch.no_grad()
def ddim_step(diffusion, model, x, t, t_prev, y=None, eta=0.0, clip_denoised=True, noise=None, cond_fn=None):
    """One DDIM update from step t to step t_prev < t (python ints; t_prev = -1 means "to x_0"):
    DDIM eq. 12,
        x_prev = sqrt(alpha_bar_prev) x^_0                        "predicted x_0"
                 + sqrt(1 - alpha_bar_prev - sigma_t^2) eps^      "direction pointing to x_t"
                 + sigma_t z                                       "random noise", z ~ N(0, I)
    with x^_0 and eps^ from the network (any of ddpm.py's prediction targets), sigma_t from eq. 16.
    A network's learned variances (Improved DDPM) are not used: eq. 16 sets the variance.
    cond_fn(x_t, t, y) -> s * grad log p(y | x_t) adds classifier guidance the DDIM way (guidance.py;
    Dhariwal & Nichol 2021, Algorithm 2, arXiv eq. 14): eps^ <- eps^ - sqrt(1 - alpha_bar_t) * s * grad, and
    x^_0 follows from the corrected eps^.
    Returns (x_prev, x^_0), each [B x C x H x W]."""
    b = x.shape[0]
    t_batch = torch.full((b,), t, device=x.device, dtype=torch.long)
    prediction, _ = diffusion.split_output(diffusion.model_output(model, x, t_batch, y), x.shape[1])
    pred_x0, eps = diffusion.predictions(x, t_batch, prediction, clip_denoised)
    alpha_bar_t = diffusion.alphas_cumprod[t]
    if cond_fn is not None:
        # ADM (arXiv) eq. 14: eps^ = eps_theta(x_t) - sqrt(1 - alpha_bar_t) grad log p_phi(y | x_t); s is
        # inside cond_fn, as in the authors' code (the printed eq. has no s)
        eps = eps - (1 - alpha_bar_t).sqrt() * cond_fn(x, diffusion.timestep_map[t_batch], y)
        pred_x0 = diffusion.predict_x0_from_eps(x, t_batch, eps)                      # DDPM eq. 15
        if clip_denoised:  # keep the pair consistent, as GaussianDiffusion.predictions does. ADM Alg. 2 does
            # not clip here; doing so keeps x^_0 in range as unguided steps do, and can trim a strong
            # guidance (a large --classifier_scale) at high noise.
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            eps = diffusion.predict_eps_from_x0(x, t_batch, pred_x0)
    alpha_bar_prev = diffusion.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(alpha_bar_t)
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)                                # eq. 16
    # eq. 12, first two terms: "predicted x_0" + "direction pointing to x_t" (clamp: float rounding only;
    # for 0 <= eta <= 1, check_eta, 1 - alpha_bar_prev - sigma^2 >= 0 exactly)
    x_prev = alpha_bar_prev.sqrt() * pred_x0 + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0 and t_prev >= 0:
        x_prev = x_prev + sigma * (torch.randn_like(x) if noise is None else noise)   # eq. 12, "random noise"
    return x_prev, pred_x0


@torch.no_grad()
def ddim_sample(diffusion, model, shape, steps=50, eta=0.0, spacing="uniform", y=None, noise=None,
                clip_denoised=True, trajectory_every=0, progress=True, cond_fn=None):
    """Generate with DDIM over S = steps sub-sequence steps: x_T ~ N(0, I), then eq. 12 from
    tau_{S-1} down to tau_0 and on to x_0. Calls the network exactly S times. Arguments and return
    value as GaussianDiffusion.sample (trajectory entries are (tau_i, x after that step, x^_0)); cond_fn
    adds classifier guidance (ddim_step)."""
    check_eta(eta)
    device = diffusion.betas.device
    tau = ddim_timesteps(diffusion.timesteps, steps, spacing).tolist()
    x = noise.to(device) if noise is not None else torch.randn(shape, device=device)
    trajectory = []
    for i in tqdm(reversed(range(len(tau))), total=len(tau), desc=f"DDIM eta={eta:g}", disable=not progress,
                  leave=False):
        x, pred_x0 = ddim_step(diffusion, model, x, tau[i], tau[i - 1] if i > 0 else -1, y, eta, clip_denoised,
                               cond_fn=cond_fn)
        if trajectory_every and (i % trajectory_every == 0 or i == len(tau) - 1):
            trajectory.append((tau[i], x.cpu(), pred_x0.cpu()))
    return (x, trajectory) if trajectory_every else x


@torch.no_grad()
def ddim_invert(diffusion, model, x0, steps=50, spacing="uniform", y=None, progress=True):
    """Encode images into the x_T that deterministic DDIM (eta = 0) decodes back into them: eq. 12 with
    sigma = 0 run forwards in t ("Equation 12 reversed" in Improved DDPM's code). The ODE view: at each
    step the network's eps^ at the current point gives x^_0, and the point is moved to the next noise
    level along the same line, x_next = sqrt(alpha_bar_next) x^_0 + sqrt(1 - alpha_bar_next) eps^.
    The image is taken as x at tau_0 (1 - alpha_bar_0 is 1e-4 at T = 1000 and 1e-3 at T = 100, linear).
    No clipping, which would break invertibility. S - 1 network calls; returns x_T [B x C x H x W]."""
    tau = ddim_timesteps(diffusion.timesteps, steps, spacing).tolist()
    x = x0
    for i in tqdm(range(len(tau) - 1), desc="DDIM inversion", disable=not progress, leave=False):
        t_batch = torch.full((x.shape[0],), tau[i], device=x.device, dtype=torch.long)
        prediction, _ = diffusion.split_output(diffusion.model_output(model, x, t_batch, y), x.shape[1])
        pred_x0, eps = diffusion.predictions(x, t_batch, prediction, clip_denoised=False)
        alpha_bar_next = diffusion.alphas_cumprod[tau[i + 1]]
        x = alpha_bar_next.sqrt() * pred_x0 + (1 - alpha_bar_next).sqrt() * eps      # eq. 12 reversed, sigma = 0
    return x


def slerp(z0, z1, alpha):
    """Spherical linear interpolation between two x_T (DDIM's interpolation experiment; the formula is
    Shoemake's 1985 slerp): theta = arccos(<z0, z1> / (|z0| |z1|)),
        z = sin((1 - alpha) theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1.
    Straight-line mixing would shrink the norm (two independent Gaussians are nearly orthogonal), giving
    an x_T that looks nothing like N(0, I) noise; slerp keeps it on the shell where such noise lives.
    z0, z1 [C x H x W]; alpha a float in [0, 1]."""
    cos_theta = (z0 * z1).sum() / (z0.norm() * z1.norm())
    theta = torch.acos(cos_theta.clamp(-1.0, 1.0))
    if theta.abs() < 1e-6:  # (nearly) the same direction: the formula is 0/0; straight lines agree
        return (1 - alpha) * z0 + alpha * z1
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


def interpolation_noise(z0, z1, points):
    """x_T for a strip: `points` slerps from z0 to z1 inclusive. [points x C x H x W]."""
    return torch.stack([slerp(z0, z1, alpha) for alpha in torch.linspace(0, 1, points).tolist()])
