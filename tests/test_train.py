"""The training aids around Algorithm 1: accumulation, EMA, learning-rate schedule, and that it learns."""
import contextlib
import copy
import math

import pytest
import torch

from ddpm import GaussianDiffusion
from model import build_model
from train import accumulate_gradients, lr_lambda, update_ema

TINY = dict(image_size=8, base_channels=16, channel_mults=[1, 2], num_res_blocks=1, dropout=0.0)


def gradients(model):
    return [p.grad.clone() for p in model.parameters()]


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger():
    """Each micro-batch's mean loss is divided by k, so the summed gradient is that of the mean over k*B."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(timesteps=50)
    model = build_model(TINY)
    for p in model.parameters():  # leave the zero start so every layer gets a gradient
        torch.nn.init.normal_(p, std=0.05)
    x0, noise, t = torch.randn(12, 3, 8, 8), torch.randn(12, 3, 8, 8), torch.randint(0, 50, (12,))

    def loss_fn(idx):
        return diffusion.training_loss(model, x0[idx], t=t[idx], noise=noise[idx])  # (per-image losses, t)

    no_scaling = torch.amp.GradScaler("cuda", enabled=False)

    big_losses, big_t = accumulate_gradients(loss_fn, [torch.arange(12)], no_scaling)
    big = gradients(model)
    model.zero_grad()
    micro_losses, micro_t = accumulate_gradients(
        loss_fn, [torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12)], no_scaling)
    micro = gradients(model)
    assert torch.allclose(micro_losses, big_losses, atol=1e-6) and torch.equal(micro_t, big_t)
    for a, b in zip(big, micro):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_only_the_last_micro_batch_synchronises_gradients():
    """With DistributedDataParallel, all but the last micro-batch run under no_sync (no all-reduce)."""
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(True)
        yield
    loss_fn = lambda batch: (torch.ones(2, requires_grad=True) * batch, torch.zeros(2, dtype=torch.long))
    accumulate_gradients(loss_fn, [1.0, 2.0, 3.0], torch.amp.GradScaler("cuda", enabled=False), no_sync)
    assert len(entered) == 2


def test_ema_is_a_separate_copy_that_trails_the_live_weights():
    torch.manual_seed(0)
    model = build_model(TINY)
    ema = copy.deepcopy(model).requires_grad_(False)
    for p, e in zip(model.parameters(), ema.parameters()):
        assert p.data_ptr() != e.data_ptr()  # never aliased
    before = [e.clone() for e in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ema, model, decay=0.999, step=10 ** 6)  # warm-up long over: decay 0.999
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, b + 0.001, atol=1e-6)  # moved 0.1% of the way
        assert not torch.equal(e, p)


def test_ema_warm_up_forgets_the_random_start_quickly():
    """decay_used = min(decay, (1 + step) / (10 + step)): 0.1 at step 0, so the EMA jumps 90% of the way."""
    ema, live = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(ema.weight)
    torch.nn.init.ones_(live.weight)
    update_ema(ema, live, decay=0.999, step=0)
    assert ema.weight.item() == pytest.approx(0.9)
    update_ema(ema, live, decay=0.5, step=10 ** 6)  # later the given decay rules
    assert ema.weight.item() == pytest.approx(0.95)


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [lr_lambda(s, warmup_steps=10, max_steps=110) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert factors[60] == pytest.approx(0.5, abs=1e-6)  # half-way through the cosine
    assert factors[110] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_a_time_budget_moves_the_cosine_along_when_time_runs_out_before_the_steps():
    # --max_minutes: the cosine follows whichever of steps and time is further along
    assert lr_lambda(20, 10, 110, time_used=0.5) == pytest.approx(0.5, abs=1e-6)  # time ahead of the steps
    assert lr_lambda(60, 10, 110, time_used=0.1) == pytest.approx(0.5, abs=1e-6)  # the steps ahead of time
    assert lr_lambda(20, 10, 110, time_used=1.0) == pytest.approx(0.0, abs=1e-9)
    # Warm-up is capped by the time cosine: a budget spent during warm-up ends at a low rate, and the end of a
    # late warm-up does not jump down (both sides of step 10 follow the time cosine there).
    assert lr_lambda(5, 10, 110, time_used=0.9) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert lr_lambda(9, 10, 110, time_used=1.0) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda(9, 10, 110, time_used=0.65) == pytest.approx(lr_lambda(10, 10, 110, time_used=0.65))
    assert lr_lambda(5, 10, 110, time_used=0.01) == pytest.approx(0.6)  # early on, warm-up rules


def test_a_tiny_model_overfits_one_batch():
    """Algorithm 1 on one fixed batch of 4 images: the eps-loss, measured on a fixed set of (t, eps),
    falls by a large factor. If the model, the loss or the update were wired wrong it would not."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(timesteps=100)
    model = build_model(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    eval_t, eval_noise = torch.tensor([5, 30, 60, 95] * 4), torch.randn(16, 3, 8, 8)
    eval_x0 = x0.repeat(4, 1, 1, 1)

    def eval_loss():
        with torch.no_grad():
            return diffusion.training_loss(model.eval(), eval_x0, t=eval_t, noise=eval_noise)[0].mean().item()

    before = eval_loss()
    model.train()
    for _ in range(150):  # enough for a 7x fall; the test asks for 5x
        loss = diffusion.training_loss(model, x0.repeat(4, 1, 1, 1))[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert before == pytest.approx(1.0, abs=0.2)  # the zero-initialised output predicts 0: loss = E[eps^2]
    assert after < before / 5, (before, after)


def test_the_sample_grid_adds_noise_independent_of_its_fixed_starting_noise(tmp_path, monkeypatch):
    """The grids start from x_T drawn by a generator seeded with --seed; their per-step noise comes from torch's
    global generator, which must not replay that stream (it did when both had the seed and --dropout 0 drew
    nothing from the global one)."""
    from conftest import TINY_TRAIN_FLAGS, make_image_folder, run_script
    make_image_folder(tmp_path / "pets")
    drawn, real_randn_like = [], torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: drawn.append(real_randn_like(x, **k)) or drawn[-1])
    run_script("train.py", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--dropout", "0", "--max_steps", "1",
               "--sample_every", "1", "--seed", "3", cwd=tmp_path)
    x_T = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))   # the grid's fixed noise
    grid_noise = [z for z in drawn if z.shape == x_T.shape]
    assert len(grid_noise) >= 19                                                   # T = 20: a z per step but the last
    assert abs(torch.corrcoef(torch.stack([grid_noise[0].flatten(), x_T.flatten()]))[0, 1]) < 0.2  # 3072 values


def test_hflip_auto_stays_off_for_digits_and_letters_by_the_data_or_its_folder_name():
    """A mirrored digit or letter is another symbol (or none): --hflip auto turns flips on only for data
    whose name, and its parent folder's, name no such data."""
    import argparse
    from train import looks_like_text
    data = lambda path=None, builtin=None: argparse.Namespace(dataset_path=path, dataset=builtin)
    for path in ("data/mnist", "data/mnist/train", "data/mnist_png/training", "data/svhn", "usps.npz",
                 "data/EMNIST_letters", "fonts/glyphs"):
        assert looks_like_text(data(path)), path
    assert looks_like_text(data(builtin="fashion_mnist"))
    for path in ("data/cars", "data/faces/train", "data/mnistake/../cats", "data/digital_art",
                 "photos/digital_camera/cats", "data/typefonts_kittens"):  # whole words only
        assert not looks_like_text(data(path)), path
    assert not looks_like_text(data()) and not looks_like_text(data(builtin="cifar10"))  # shapes, cifar10
