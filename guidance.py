"""
guidance.py: steering a diffusion model towards a class.

Two papers, two ways to sample from p(x | y) instead of p(x):

  Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598)
    Training (their Algorithm 1): one network learns both eps_theta(x_t, y) and the unconditional
    eps_theta(x_t) = eps_theta(x_t, null), because each training label is replaced by the "no label"
    index with probability p_uncond (drop_labels). Sampling (their eq. 6):
        eps~ = (1 + w) eps_theta(x_t, y) - w eps_theta(x_t)
    pushes samples away from the unconditional prediction, towards what makes them look like y.

  Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", arXiv 2105.05233, Sec. 4)
    A separate classifier p_phi(y | x_t), trained on noisy images at every t (model.NoisyClassifier),
    supplies grad_{x_t} log p_phi(y | x_t). Their Algorithm 1 shifts the mean of each DDPM step by
    s * Sigma * grad (eq. 10); their Algorithm 2 (DDIM) corrects the noise prediction instead (eq. 14):
        eps^ = eps_theta(x_t) - sqrt(1 - alpha_bar_t) * s * grad.
    Equation numbers are the arXiv version's (the NeurIPS version has no eq. 14 in its main text). The
    printed eq. 14 and Algorithm 2 have no s; like the authors' code, we multiply the gradient by s.
    The shift itself lives where each sampler computes its step (ddpm.GaussianDiffusion.p_sample,
    ddim.ddim_step); this file makes the gradient (classifier_gradient).

THE GUIDANCE SCALE CONVENTION (stated once, here; the README repeats it):
    --guidance_scale s, with eps~ = eps_theta(x_t) + s * (eps_theta(x_t, y) - eps_theta(x_t)).
    s = 1 is NO guidance (the plain conditional model), s = 0 is the unconditional model, s > 1 guides.
    This is Imagen's and diffusers' "guidance scale"; the CFG paper's w is s - 1 (so its w = 0, "no
    guidance", is our s = 1).
    --classifier_scale s multiplies the classifier's gradient (ADM Sec. 4.3): 0 is no guidance.

Timesteps follow ddpm.py (code t = 0 .. T-1). Shapes: x_t [B x C x H x W], t and y int64 [B].
"""
import torch
import torch.nn.functional as F


def drop_labels(y, p_uncond, null_label, coins=None):
    """CFG Algorithm 1, "c <- null with probability p_uncond": replace each label, on its own coin,
    by the "no label" index (model.UNet reserves index num_classes for it). Per sample, not per batch,
    so every batch trains the conditional and the unconditional model side by side. y int64 [B];
    coins (uniform on [0, 1), [B]) may be passed in instead of drawn."""
    if p_uncond <= 0:
        return y
    if coins is None:
        coins = torch.rand(y.shape, device=y.device)
    drop = coins < p_uncond                                            # [B] bool, each True with prob p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def classifier_free_guidance(model, guidance_scale, null_label):
    """Wrap a class-conditional network so that it returns the guided prediction of CFG eq. 6,
        eps~ = (1 + w) eps_theta(x_t, y) - w eps_theta(x_t),  with w = guidance_scale - 1, i.e.
        eps~ = eps_theta(x_t) + s (eps_theta(x_t, y) - eps_theta(x_t)),  s = guidance_scale.
    The result is a model(x_t, t, y) like any other, so Algorithm 2 (ddpm.py) and DDIM (ddim.py) use it
    unchanged. Both predictions come from ONE forward pass over the doubled batch [x_t; x_t] with labels
    [y; null]: the same work as two passes, but one call, which keeps a GPU busier.

    Why guiding the raw output is right for every prediction target: for a fixed x_t and t, eps is an
    affine function of what the network predicts (eps itself, x_0 or v; ddpm.py), and eq. 6's weights
    (1 + w) and -w sum to 1, so guiding the output and then converting equals converting then guiding.
    With learned variances (2C output channels) only the first C are guided; the variances are the
    conditional model's, as in GLIDE's and ADM's code, except at s = 0, which is the unconditional model
    itself (variances included), as sample.py and guidance_sweep.py describe it."""
    def guided(x, t, y=None):
        if y is None:
            raise ValueError("classifier-free guidance needs labels y")
        null = torch.full_like(y, null_label)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))   # [2B x C_out x H x W]
        conditional, unconditional = out.chunk(2)                                # each [B x C_out x H x W]
        c = x.shape[1]
        guided_prediction = unconditional[:, :c] + guidance_scale * (conditional[:, :c] - unconditional[:, :c])
        variances = (unconditional if guidance_scale == 0 else conditional)[:, c:]  # [B x C x H x W] or empty
        return torch.cat([guided_prediction, variances], dim=1)                  # eq. 6 (+ variances)
    return guided


def classifier_training_loss(classifier, diffusion, x0, y, t, noise):
    """Training the classifier of ADM Sec. 4: noise each image to its level t with q(x_t | x_0) (DDPM
    eq. 4) and score -log p_phi(y | x_t), so the classifier learns to name the class at every noise level
    the sampler will ask about. x0, noise [B x C x H x W]; y, t int64 [B]. Returns per-image losses [B]."""
    xt = diffusion.q_sample(x0, t, noise)                                   # DDPM eq. 4
    logits = classifier(xt, t)                                              # [B x K]
    return F.cross_entropy(logits.float(), y, reduction="none")             # -log p_phi(y | x_t)


@torch.no_grad()
def noisy_accuracy(classifier, diffusion, x0, y, levels):
    """How often the classifier names the class of x0 [B x C x H x W] (labels y [B]) after noising to each
    t in levels (DDPM eq. 4, fresh noise): {t: fraction correct}. train.py's progress line for a
    --task classifier run, in place of a sample grid."""
    accuracy = {}
    for level in levels:
        t = torch.full((len(x0),), level, device=x0.device, dtype=torch.long)
        predicted = classifier(diffusion.q_sample(x0, t, torch.randn_like(x0)), t).argmax(1)
        accuracy[level] = (predicted == y.to(x0.device)).float().mean().item()
    return accuracy


def classifier_gradient(classifier, x, t, y):
    """g = grad_{x_t} log p_phi(y | x_t), [B x C x H x W]: ADM eq. 6's g, taken at the current x_t as ADM
    Alg. 1 and the authors' code take it (eq. 6 writes it at x_t = mu, the point of its Taylor expansion).
    Each sample's log-probability depends only on its own x_t, so the gradient of their sum gives every
    sample's own gradient in one backward pass. t is the network timestep (what the classifier was
    trained with)."""
    with torch.enable_grad():                                   # samplers run under no_grad
        x_in = x.detach().float().requires_grad_(True)
        log_probs = torch.log_softmax(classifier(x_in, t).float(), dim=-1)   # [B x K]
        chosen = log_probs[torch.arange(len(y), device=y.device), y]        # log p_phi(y | x_t), [B]
        return torch.autograd.grad(chosen.sum(), x_in)[0]


def classifier_guidance(classifier, scale):
    """cond_fn(x_t, t, y) -> s * grad_{x_t} log p_phi(y | x_t), the term ADM Algorithm 1 (times Sigma,
    ddpm.p_sample) and Algorithm 2 (times sqrt(1 - alpha_bar_t), ddim.ddim_step) add. The scale s is
    ADM Sec. 4.3's: s * grad log p(y | x) = grad log (p(y | x)^s / Z), a sharper classifier for s > 1."""
    def cond_fn(x, t, y):
        return scale * classifier_gradient(classifier, x, t, y)
    return cond_fn
