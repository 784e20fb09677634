"""guidance.py: classifier-free guidance (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021)."""
import torch

from conftest import randomise_zero_inits
from ddim import ddim_step
from ddpm import GaussianDiffusion
from guidance import (classifier_free_guidance, classifier_gradient, classifier_guidance, classifier_training_loss,
                      drop_labels, noisy_accuracy)
from model import build_classifier, build_model

TINY = dict(image_size=16, base_channels=16, channel_mults=[1, 2], num_res_blocks=1)


def test_label_dropout_is_per_sample_at_the_requested_rate():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (200_000,))
    dropped = drop_labels(y, 0.1, null_label=10)
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.1) < 0.003           # the rate
    assert torch.equal(dropped[~is_null], y[~is_null])                # the others are untouched
    # Per sample, not per batch: batches of 64 almost never drop all or nothing.
    per_batch = is_null[:64 * 1000].reshape(1000, 64).sum(1)
    assert (per_batch == 0).float().mean() < 0.01 and per_batch.max() < 64
    assert torch.equal(drop_labels(y, 0.0, 10), y)


def test_guidance_scale_one_is_exactly_the_conditional_model():
    """The README's convention: s = 1 is no guidance (the CFG paper's w = 0, eq. 6)."""
    model = randomise_zero_inits(build_model(dict(TINY, num_classes=3)))
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 5, 10, 19]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert torch.allclose(classifier_free_guidance(model, 1.0, 3)(x, t, y), model(x, t, y), atol=1e-5)
        # and s = 0 is the unconditional model (the "no label" row)
        assert torch.allclose(classifier_free_guidance(model, 0.0, 3)(x, t, y), model(x, t, torch.full_like(y, 3)),
                              atol=1e-5)


def test_batched_guidance_equals_separate_conditional_and_unconditional_passes():
    model = randomise_zero_inits(build_model(dict(TINY, num_classes=3)))
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([2, 9, 17]), torch.tensor([2, 0, 1])
    w = 2.5  # the CFG paper's w; our scale s = 1 + w
    with torch.no_grad():
        conditional, unconditional = model(x, t, y), model(x, t, torch.full_like(y, 3))
        expected = (1 + w) * conditional - w * unconditional                 # CFG eq. 6
        assert torch.allclose(classifier_free_guidance(model, 1 + w, 3)(x, t, y), expected, atol=1e-5)


def test_guidance_with_learned_variances_guides_only_the_prediction_channels():
    model = randomise_zero_inits(build_model(dict(TINY, num_classes=2, out_channels=6)))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 4]), torch.tensor([0, 1])
    with torch.no_grad():
        out = classifier_free_guidance(model, 4.0, 2)(x, t, y)
        conditional, unconditional = model(x, t, y), model(x, t, torch.full_like(y, 2))
    assert out.shape == (2, 6, 16, 16)
    assert torch.allclose(out[:, 3:], conditional[:, 3:], atol=1e-6)          # variances: the conditional's
    assert torch.allclose(out[:, :3], unconditional[:, :3] + 4 * (conditional[:, :3] - unconditional[:, :3]), atol=1e-5)
    with torch.no_grad():  # s = 0 is the unconditional model, its variances too
        assert torch.allclose(classifier_free_guidance(model, 0.0, 2)(x, t, y), unconditional, atol=1e-6)


def test_classifier_gradient_is_each_samples_own_gradient_of_log_p():
    classifier = randomise_zero_inits(build_classifier(dict(TINY, num_classes=4)))
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 8, 15]), torch.tensor([3, 0, 2])
    grad = classifier_gradient(classifier, x, t, y)
    assert grad.shape == x.shape and not x.requires_grad
    # Sample 1's gradient alone equals its slice of the batched gradient, and a finite difference agrees.
    alone = classifier_gradient(classifier, x[1:2], t[1:2], y[1:2])
    assert torch.allclose(alone, grad[1:2], atol=1e-5)
    direction = torch.randn_like(x[:1])
    direction /= direction.norm()
    h = 1e-2

    def log_p(z):
        with torch.no_grad():
            return torch.log_softmax(classifier(z, t[:1]), -1)[0, y[0]]
    finite = (log_p(x[:1] + h * direction) - log_p(x[:1] - h * direction)) / (2 * h)
    analytic = (grad[:1] * direction).sum()
    assert abs(finite.item() - analytic.item()) < 0.02 * abs(analytic.item()) + 1e-4


def test_classifier_guided_ddpm_step_moves_the_mean_by_sigma_times_s_times_the_gradient():
    """ADM Algorithm 1 line 4: x_{t-1} ~ N(mu + s Sigma grad log p(y | x_t), Sigma), so with the same z
    the guided and unguided steps differ by exactly s Sigma grad, and log p(y | .) goes up."""
    diffusion = GaussianDiffusion(timesteps=20)
    model = randomise_zero_inits(build_model(dict(TINY)))
    classifier = randomise_zero_inits(build_classifier(dict(TINY, num_classes=4)))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 10]), torch.tensor([1, 3])
    s = 3.0
    torch.manual_seed(1)
    plain, _ = diffusion.p_sample(model, x, t, clip_denoised=False)
    torch.manual_seed(1)
    guided, _ = diffusion.p_sample(model, x, t, y, clip_denoised=False, cond_fn=classifier_guidance(classifier, s))
    variance = diffusion.posterior_variance[10]
    shift = s * variance * classifier_gradient(classifier, x, t, y)
    assert torch.allclose(guided - plain, shift, atol=1e-6)

    def log_p(z):
        with torch.no_grad():
            return torch.log_softmax(classifier(z, t), -1)[torch.arange(2), y]
    mean = diffusion.p_mean_variance(model, x, t, clip_denoised=False)["mean"]
    assert torch.all(log_p(mean + shift) > log_p(mean))


def test_classifier_guided_ddim_step_corrects_eps_as_in_adm_eq_14():
    """ADM eq. 14: eps^ = eps - sqrt(1 - alpha_bar_t) g. Through DDIM eq. 12 (eta 0) the step changes by
    [sqrt(ab_prev) (1 - ab_t) / sqrt(ab_t) - sqrt(1 - ab_prev) sqrt(1 - ab_t)] g."""
    diffusion = GaussianDiffusion(timesteps=20)
    model = randomise_zero_inits(build_model(dict(TINY)))
    classifier = randomise_zero_inits(build_classifier(dict(TINY, num_classes=4)))
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    t, t_prev = 12, 6
    plain, _ = ddim_step(diffusion, model, x, t, t_prev, clip_denoised=False)
    guided, _ = ddim_step(diffusion, model, x, t, t_prev, y, clip_denoised=False,
                          cond_fn=classifier_guidance(classifier, 2.0))
    g = 2.0 * classifier_gradient(classifier, x, torch.tensor([t, t]), y)
    ab_t, ab_prev = diffusion.alphas_cumprod[t], diffusion.alphas_cumprod[t_prev]
    factor = ab_prev.sqrt() * (1 - ab_t) / ab_t.sqrt() - (1 - ab_prev).sqrt() * (1 - ab_t).sqrt()
    assert torch.allclose(guided - plain, factor * g, atol=1e-5)


def sign_of_mean_classifier(x, t):
    """A classifier that names class 0 for a bright image and class 1 for a dark one, blind to t:
    logits [B x 2] = [mean, -mean] of each image."""
    m = x.mean(dim=(1, 2, 3))
    return torch.stack([m, -m], dim=1)


def test_classifier_training_loss_is_minus_log_p_y_of_the_image_noised_to_t():
    """ADM Sec. 4: the classifier is trained on x_t ~ q(x_t | x_0) (DDPM eq. 4), so its loss must be
    -log p_phi(y | x_t) for the x_t built from this t and this noise, not for the clean x_0."""
    diffusion = GaussianDiffusion(timesteps=100)
    x0, noise = torch.full((4, 1, 8, 8), 0.5), torch.randn(4, 1, 8, 8)
    y, t = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 99, 0, 99])
    losses = classifier_training_loss(sign_of_mean_classifier, diffusion, x0, y, t, noise)
    xt = diffusion.alphas_cumprod[t].sqrt()[:, None, None, None] * x0 + \
        (1 - diffusion.alphas_cumprod[t]).sqrt()[:, None, None, None] * noise        # DDPM eq. 4
    expected = -torch.log_softmax(sign_of_mean_classifier(xt, t), dim=1)[torch.arange(4), y]
    assert losses.shape == (4,) and torch.allclose(losses, expected, atol=1e-6)
    # At t = 0 the image is nearly clean: the right class (0, bright) costs less than the wrong one.
    assert losses[0] < losses[2]


def test_noisy_accuracy_falls_from_perfect_to_chance_as_noise_drowns_the_image():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(timesteps=1000)
    y = torch.randint(0, 2, (2000,))
    x0 = torch.where(y[:, None, None, None] == 0, 0.5, -0.5).expand(-1, 1, 8, 8)   # bright = 0, dark = 1
    accuracy = noisy_accuracy(sign_of_mean_classifier, diffusion, x0, y, (0, 999))
    assert list(accuracy) == [0, 999]
    assert accuracy[0] == 1.0                               # sqrt(alpha_bar_0) x_0 dominates its noise
    assert abs(accuracy[999] - 0.5) < 0.05                  # sqrt(alpha_bar_999) ~ 0.006: a coin toss
