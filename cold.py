"""
cold.py: Cold Diffusion (Bansal et al. 2022, arXiv 2208.09392): diffusion without Gaussian noise.

DDPM destroys an image by adding noise and learns to undo one small step at a time. Cold Diffusion
asks whether the noise matters, and answers that any degradation D(x_0, s) with a level s will do,
as long as s = 0 leaves the image alone and larger s destroy more of it:

    blur      Gaussian blur whose width grows with s; at s = T every pixel is its channel's mean
    pixelate  downsample to fewer pixels and back up (nearest); at s = T one pixel: again the mean
    mask      a growing black square over the image's centre (inpainting); at s = T all black
    fade      blend the image towards its channel means; at s = T the means alone

A network R(x_s, s) is trained to restore x_0 from D(x_0, s): the restoration loss
min_theta E || R_theta(D(x_0, s), s) - x_0 || (l1 by default, as in the authors' code), with s
uniform on 1 .. T. This is the analogue of Algorithm 1 of DDPM with x_0 as the target.

Levels and timesteps: the network sees ddpm.py's code t = 0 .. T-1, here t = s - 1 for the paper's
level s = 1 .. T. D takes the level s itself, so D(x_0, 0) = x_0 (no degradation) and x_t of code t
is D(x_0, t + 1). What a user sees counts levels, as the paper does: --cold_level and the labels of
sampling trajectories (GIF frames) are s = 1 .. T, one above a DDPM trajectory's code t.

Sampling from a fully degraded x_T runs the levels back down, in one of two ways (the paper's two
algorithms; their numbers are from the authors' README and code, PAPERS.md sec. 8):
    Algorithm 1 (naive)      x0_hat = R(x_s, s);  x_{s-1} = D(x0_hat, s-1)
    Algorithm 2 (improved)   x0_hat = R(x_s, s);  x_{s-1} = x_s - D(x0_hat, s) + D(x0_hat, s-1)
Algorithm 2 only asks R to get the *change* between two levels right: errors in x0_hat that D(., s)
and D(., s-1) both keep cancel. With a perfect restorer both return x_0 exactly (a test checks it).

Generation needs different starting points, or every sample would be the same image. blur,
pixelate and fade all end in a constant image per channel (the channel means), so the start is a
random set of channel means, drawn from a Gaussian mixture fitted to the training images' means:
the paper's trick for blur. mask ends in black for every image, so a masked model restores images
(sample.py --cold_restore) but cannot generate.

Tensors: images x [B x C x H x W] in [-1, 1]; levels s int64 [B] in 0 .. T.
"""
import math

import torch
from tqdm import tqdm

from utils import UsageError, tensors_to

DEGRADATIONS = ("blur", "pixelate", "mask", "fade")
COLD_LOSSES = ("l1", "l2")
COLD_SAMPLERS = ("improved", "naive")   # Algorithm 2, Algorithm 1
GENERATES = ("blur", "pixelate", "fade")  # the degradations that end in the channel means
MIXTURE_COMPONENTS = 10


# ---------------------------------------------------------------------------------------------
# The degradations D(x_0, s): each a linear map of the image, precomputed for every level
# ---------------------------------------------------------------------------------------------

def blur_matrices(size, timesteps):
    """[T+1 x S x S]: row i of level s holds the Gaussian weights exp(-(i - j)^2 / (2 sigma_s^2)) over
    the pixels j of one image row, normalised to sum to 1 (so at the borders the weights that would
    fall outside the image are given to the pixels inside, rather than to zero padding). A 2-D blur
    is then A x A^T (rows, then columns). sigma_s = (size / 4) * s / (T - 1) for s < T: 0 at s = 0
    (the identity) up to a quarter of the image; at s = T the weights are uniform, so each pixel
    becomes its channel's mean (the limit of sigma -> infinity)."""
    i = torch.arange(size, dtype=torch.float64)
    distance2 = (i[:, None] - i[None, :]) ** 2                                       # [S x S]
    matrices = []
    for s in range(timesteps + 1):
        if s == 0:
            a = torch.eye(size, dtype=torch.float64)
        elif s == timesteps:
            a = torch.full((size, size), 1.0 / size, dtype=torch.float64)
        else:
            sigma = (size / 4) * s / max(timesteps - 1, 1)
            a = torch.exp(-distance2 / (2 * sigma ** 2))
            a = a / a.sum(dim=1, keepdim=True)
        matrices.append(a)
    return torch.stack(matrices).float()


def pixelate_matrices(size, timesteps):
    """[T+1 x S x S]: down-sampling to r_s pixels per side by averaging, then up again by repeating
    (nearest), as one matrix: row i averages the pixels j in the same block as i. r_s falls
    geometrically from size (s = 0, the identity) to 1 (s = T, the channel mean)."""
    i = torch.arange(size)
    matrices = []
    for s in range(timesteps + 1):
        r = max(1, round(size ** (1 - s / timesteps)))
        block = i * r // size                                                         # block of each pixel [S]
        same = (block[:, None] == block[None, :]).double()
        matrices.append(same / same.sum(dim=1, keepdim=True))
    return torch.stack(matrices).float()


def mask_fractions(timesteps):
    """[T+1]: the side of the black centre square as a fraction of the image, s / T."""
    return torch.arange(timesteps + 1, dtype=torch.float32) / timesteps


def fade_weights(timesteps):
    """[T+1]: the image's share w_s = cos(pi/2 * s / T), 1 at s = 0 and 0 at s = T; the channel
    means get 1 - w_s."""
    return torch.cos(0.5 * math.pi * torch.arange(timesteps + 1, dtype=torch.float64) / timesteps).float()


class ColdDiffusion:
    """A deterministic degradation with T levels, its restoration loss, and the two samplers.
    Like GaussianDiffusion, it holds no network: methods take a callable model(x, t, y) -> x0_hat."""

    def __init__(self, degradation="blur", timesteps=50, image_size=32, loss="l1", start_mixture=None, **unknown):
        if unknown:  # ColdDiffusion(**checkpoint["cold_config"]) of a newer version's (or edited) file
            raise UsageError(f"unknown Cold Diffusion settings: {sorted(unknown)} (a checkpoint written by a newer "
                             "version, or edited?)")
        if degradation not in DEGRADATIONS:
            raise UsageError(f"--degradation {degradation}: unknown; choose one of {', '.join(DEGRADATIONS)}")
        if loss not in COLD_LOSSES:
            raise UsageError(f"--loss {loss}: Cold Diffusion restores x_0 with l1 or l2")
        if timesteps < 1:
            raise UsageError(f"--timesteps {timesteps}: must be at least 1")
        self.degradation, self.timesteps, self.image_size, self.loss = degradation, timesteps, image_size, loss
        self.start_mixture = start_mixture  # a plain dict (fit_start_mixture), saved in the checkpoint
        if degradation == "blur":
            self.matrices = blur_matrices(image_size, timesteps)                      # [T+1 x S x S]
        elif degradation == "pixelate":
            self.matrices = pixelate_matrices(image_size, timesteps)
        elif degradation == "mask":
            self.fractions = mask_fractions(timesteps)                                # [T+1]
        else:
            self.weights = fade_weights(timesteps)                                    # [T+1]
        self.no_op_levels = self.levels_equal_to_the_one_below()

    def levels_equal_to_the_one_below(self):
        """The levels s in 1 .. T with D(., s) = D(., s-1), as a set. Pixelate has only S block counts
        and mask only S + 1 square sides for T + 1 levels, so with T >= S (the default T = 50 at 32x32)
        many levels repeat: there pixelate's r_s runs 2, 2, 2, ... 1, 1, 1 for the last dozen levels.
        Algorithm 2's step x_s - D(x0_hat, s) + D(x0_hat, s-1) is then x_s itself, so the improved
        sampler skips those levels without running the network (the result is the same)."""
        if self.degradation in ("blur", "pixelate"):
            return {s for s in range(1, self.timesteps + 1) if torch.equal(self.matrices[s], self.matrices[s - 1])}
        if self.degradation == "mask":
            sides = (self.fractions * self.image_size).round().long().tolist()        # as in degrade
            return {s for s in range(1, self.timesteps + 1) if sides[s] == sides[s - 1]}
        return set()                                                                  # fade: cos falls strictly

    def config(self):
        """The plain dict a checkpoint stores; ColdDiffusion(**config) rebuilds this object."""
        return dict(degradation=self.degradation, timesteps=self.timesteps, image_size=self.image_size,
                    loss=self.loss, start_mixture=self.start_mixture)

    def to(self, device):
        """Move the precomputed operators to device."""
        return tensors_to(self, device)

    def describe(self):
        return (f"cold diffusion (cold.py): {self.degradation}, T={self.timesteps} levels, restores x_0 with "
                f"{self.loss} loss")

    def degrade(self, x0, s):
        """D(x_0, s): x0 [B x C x H x W], levels s int64 [B] in 0 .. T -> [B x C x H x W]; D(x, 0) = x."""
        if self.degradation in ("blur", "pixelate"):
            a = self.matrices[s][:, None]                                             # [B x 1 x S x S]
            return a @ x0 @ a.transpose(-1, -2)                                       # rows, then columns
        means = x0.mean(dim=(2, 3), keepdim=True)                                     # [B x C x 1 x 1]
        if self.degradation == "fade":
            w = self.weights[s].view(-1, 1, 1, 1)
            return w * x0 + (1 - w) * means
        size = self.image_size                                                        # mask: a black square
        side = (self.fractions[s] * size).round().long()                              # [B], 0 .. S
        start = (size - side) // 2
        i = torch.arange(size, device=x0.device)
        inside = (i[None, :] >= start[:, None]) & (i[None, :] < (start + side)[:, None])   # [B x S]
        square = inside[:, :, None] & inside[:, None, :]                               # [B x S x S]
        return torch.where(square[:, None], torch.full_like(x0, -1.0), x0)            # -1 is black

    # --- training: the restoration loss ----------------------------------------------------------

    def training_loss(self, model, x0, y=None, t=None):
        """One step's loss, per image [B], and t [B]:  || R(D(x_0, t + 1), t) - x_0 ||, with code t
        uniform on 0 .. T-1 (the paper's s = t + 1 uniform on 1 .. T) and the distance averaged over
        each image's pixels."""
        if t is None:
            t = torch.randint(0, self.timesteps, (x0.shape[0],), device=x0.device)
        xt = self.degrade(x0, t + 1)
        x0_hat = model(xt, t, y).float()
        distance = (x0_hat - x0).abs() if self.loss == "l1" else (x0_hat - x0) ** 2
        return distance.mean(dim=(1, 2, 3)), t

    # --- sampling: Algorithms 1 and 2 ------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, x_T, y=None, sampler="improved", steps=None, trajectory_every=0, progress=True):
        """Run the levels down from x_T (a fully degraded image, level T, or any x_s with steps = s)
        to x_0. sampler 'improved' is Algorithm 2, 'naive' Algorithm 1 (see the top of the file).
        The improved sampler runs the network only at levels whose D differs from the level below's
        (levels_equal_to_the_one_below): about half of them for pixelate at 32x32 with T = 50.
        Returns x_0 [B x C x H x W], and with trajectory_every > 0 also a list of (s, x_{s-1}, x0_hat)
        every that many levels: the level just restored, the image that step gave, and its estimate of
        x_0 (for GIFs, as GaussianDiffusion.sample returns them)."""
        if sampler not in COLD_SAMPLERS:
            raise UsageError(f"--cold_sampler {sampler}: choose one of {', '.join(COLD_SAMPLERS)}")
        steps = self.timesteps if steps is None else steps
        x, b, trajectory, x0_hat = x_T, x_T.shape[0], [], None
        for s in tqdm(range(steps, 0, -1), desc=f"cold {sampler}", disable=not progress, leave=False):
            level = torch.full((b,), s, device=x.device, dtype=torch.long)
            if sampler == "naive":
                x0_hat = model(x, level - 1, y).float().clamp(-1, 1)                  # R(x_s, s): code t = s-1
                x = self.degrade(x0_hat, level - 1)                                   # Alg. 1
            elif s not in self.no_op_levels:  # else D(., s) = D(., s-1): the step would give x_s back
                x0_hat = model(x, level - 1, y).float().clamp(-1, 1)
                x = x - self.degrade(x0_hat, level) + self.degrade(x0_hat, level - 1)  # Alg. 2
            if trajectory_every and (s % trajectory_every == 0 or s == 1) and x0_hat is not None:
                trajectory.append((s, x, x0_hat))  # a skipped level shows the last estimate
        return (x, trajectory) if trajectory_every else x

    # --- generation: where to start --------------------------------------------------------------

    def start_images(self, num, channels, generator=None, device="cpu"):
        """Fully degraded starting images for generation: constant per channel, the channel means drawn
        from the Gaussian mixture fitted to the training data (fit_start_mixture) -> [N x C x S x S]."""
        if self.degradation not in GENERATES:
            raise UsageError(f"a Cold Diffusion model with --degradation {self.degradation} cannot generate: every "
                             "fully degraded image is the same black square; restore images with --cold_restore DIR")
        if not self.start_mixture:
            raise UsageError("this checkpoint has no start distribution (start_mixture); retrain it with this train.py")
        means = sample_mixture(self.start_mixture, num, generator)                    # [N x C]
        means = means.clamp(-1, 1).view(num, channels, 1, 1).to(device)
        return means.expand(num, channels, self.image_size, self.image_size).contiguous()


# ---------------------------------------------------------------------------------------------
# A Gaussian mixture over the channel means of the training images (the stochastic start)
# ---------------------------------------------------------------------------------------------

def fit_start_mixture(points, components=MIXTURE_COMPONENTS, iterations=100, seed=0):
    """Fit a Gaussian mixture with full covariances to points [N x C] by expectation-maximisation
    (Dempster, Laird, Rubin 1977), in float64. Returns plain lists: weights [K], means [K x C],
    covariances [K x C x C]."""
    x = points.double()
    n, c = x.shape
    k = min(components, n)
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randperm(n, generator=g)[:k]].clone()                             # [K x C]
    ridge = 1e-6 * torch.eye(c, dtype=torch.float64)
    covariances = (torch.cov(x.T).reshape(c, c) + ridge).expand(k, c, c).clone()      # [K x C x C]
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    for _ in range(iterations):
        # E-step: responsibilities r_nk = p(component k | x_n)
        log_p = torch.distributions.MultivariateNormal(means, covariance_matrix=covariances).log_prob(x[:, None])
        r = torch.softmax(log_p + weights.log(), dim=1)                               # [N x K]
        # M-step: the weighted counts, means and covariances
        counts = r.sum(dim=0) + 1e-10                                                 # [K]
        weights = counts / n
        means = (r.T @ x) / counts[:, None]
        centred = x[:, None, :] - means[None]                                         # [N x K x C]
        covariances = torch.einsum("nk,nki,nkj->kij", r, centred, centred) / counts[:, None, None] + ridge
    return dict(weights=weights.tolist(), means=means.tolist(), covariances=covariances.tolist())


def sample_mixture(mixture, num, generator=None):
    """num draws [N x C] from a mixture dict of fit_start_mixture."""
    weights = torch.tensor(mixture["weights"], dtype=torch.float64)
    means = torch.tensor(mixture["means"], dtype=torch.float64)
    covariances = torch.tensor(mixture["covariances"], dtype=torch.float64)
    component = torch.multinomial(weights, num, replacement=True, generator=generator)   # [N]
    chol = torch.linalg.cholesky(covariances[component])                                # [N x C x C]
    z = torch.randn(num, means.shape[1], 1, generator=generator, dtype=torch.float64)
    return (means[component] + (chol @ z).squeeze(-1)).float()


def channel_means(images_uint8):
    """The channel means of fully degraded images, in the model's range [-1, 1]: uint8 [N x C x H x W]
    -> [N x C]. Blur, pixelate and fade all end in these."""
    return images_uint8.float().mean(dim=(2, 3)) / 127.5 - 1.0
