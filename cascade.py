"""
cascade.py: image-conditioned diffusion. Super-resolution (SR3: Saharia et al. 2021, arXiv 2104.07636),
cascades of a base model and a super-resolution model (Cascaded Diffusion Models, CDM: Ho et al. 2021,
arXiv 2106.15282), and paired image-to-image translation (the same machinery with any input image).

The idea, from SR3: the denoiser sees a conditioning image c of the output's size, concatenated to x_t
as extra input channels: eps_theta([x_t, c], t) (model.UNet, cond_channels). Nothing in ddpm.py or
ddim.py changes. Training is Algorithm 1 and sampling Algorithm 2 or DDIM, with the network wrapped by
conditioned() so that every call carries c. For super-resolution, c is the low-resolution image
upsampled with bicubic interpolation to the output size (SR3's choice): the model only has to add detail.

A cascade (CDM) chains a base model at low resolution and an SR model: base samples -> SR -> a larger
image. The SR model trains on real low-resolution images but at sampling time it sees the base model's
samples, which are slightly off. CDM's remedy is "conditioning augmentation" (section number not
confirmed here, so cited by name): during training, corrupt c with Gaussian noise through the forward
process, c_s ~ q(c_s | c) = N(sqrt(alpha_bar_s) c, (1 - alpha_bar_s) I) (DDPM eq. 4), at a random level
s, and tell the network s (UNet's cond_t). At sampling, c is corrupted at one fixed level, saved in
the SR checkpoint, so small artefacts of the base samples drown in noise the model knows how to ignore.

Levels s use ddpm.py's timestep convention (code t = 0 .. T-1) and the SR model's own schedule;
s = 0 adds noise of standard deviation sqrt(beta_1): 0.01, about one grey level, with the linear
schedule at T = 1000 (0.006 cosine; 0.03, four grey levels, linear at T = 100): effectively clean.
Shapes: images [B x C x H x W] in [-1, 1]; s int64 [B].
"""
import torch
import torch.nn.functional as F

TASKS = ("diffusion", "classifier", "super_resolution", "image_to_image")


def downsample(images, size):
    """[B x C x S x S] -> [B x C x size x size], bicubic with antialiasing (a proper low-pass, like
    resizing a photo), clamped to the data range."""
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1.0, 1.0)


def upsample(images, size):
    """[B x C x s x s] -> [B x C x size x size] by bicubic interpolation: SR3's conditioning input."""
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def low_res_condition(x0, low_res):
    """What the SR model is trained to invert: x_0 [B x C x S x S] shrunk to low_res, then blown back up
    to S, so the conditioning image has the output's size (SR3). Returns c [B x C x S x S]."""
    return upsample(downsample(x0, low_res), x0.shape[-1])


def augment_condition(diffusion, cond, s, noise=None):
    """Conditioning augmentation (CDM): c_s = sqrt(alpha_bar_s) c + sqrt(1 - alpha_bar_s) eps, DDPM
    eq. 4 applied to the conditioning image. cond [B x C x S x S], s int64 [B] -> c_s, same shape.
    noise (eps, like cond) may be passed in instead of drawn."""
    return diffusion.q_sample(cond, s, torch.randn_like(cond) if noise is None else noise)


def random_augmentation_levels(batch_size, max_level, device, generator=None):
    """Training: a level s for each sample, uniform on {0, ..., max_level}. int64 [B]."""
    return torch.randint(0, max_level + 1, (batch_size,), device=device, generator=generator)


def sampling_level(conditioning):
    """The fixed augmentation level an SR model is sampled with: its saved sample_aug_t, or None when it
    was trained without augmentation (aug_max_t 0). conditioning: the checkpoint's plain dict."""
    return conditioning["sample_aug_t"] if conditioning.get("aug_max_t") else None


def conditioned(model, cond, cond_t=None):
    """The image-conditioned network as the callable model(x_t, t, y) that ddpm.py and ddim.py expect:
    every call carries the conditioning image cond [B x C_cond x S x S] (and its level cond_t [B])."""
    return lambda x, t, y=None: model(x, t, y, cond=cond, cond_t=cond_t)


def sr_condition(diffusion, low_images, image_size, level):
    """Sampling: the conditioning for low-resolution images (a base model's samples, or your own),
    [B x C x s x s] in [-1, 1] -> (c_s [B x C x S x S], s [B]): upsampled, then augmented at the fixed
    level saved in the SR checkpoint (CDM). level None: no augmentation (a model trained without it)."""
    cond = upsample(low_images, image_size)
    if level is None:
        return cond, None
    s = torch.full((len(cond),), int(level), device=cond.device, dtype=torch.long)
    return augment_condition(diffusion, cond, s), s


def cascade_upscale(sr_diffusion, sr_model, conditioning, low_images, out_size, generate, batch_size):
    """A cascade (CDM): the base model's samples low_images [N x C x s x s] in [-1, 1] -> the SR model's
    outputs [N x C x out_size x out_size] in [-1, 1], on the CPU. Each batch is upsampled and augmented
    at the SR checkpoint's fixed level (sr_condition), then decoded from fresh x_T by generate(network,
    x_T) -- Algorithm 2, respaced or DDIM, whichever sampler the base model used -- with every network
    call carrying the conditioning image (conditioned)."""
    device, level = sr_diffusion.betas.device, sampling_level(conditioning)
    out = []
    for start in range(0, len(low_images), batch_size):
        cond, cond_t = sr_condition(sr_diffusion, low_images[start:start + batch_size].to(device), out_size, level)
        noise = torch.randn(len(cond), low_images.shape[1], out_size, out_size, device=device)   # x_T
        out.append(generate(conditioned(sr_model, cond, cond_t), noise).cpu())
    return torch.cat(out)
