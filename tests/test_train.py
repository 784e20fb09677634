"""The training aids around Algorithm 1: accumulation, EMA, learning-rate schedule, and that it learns."""
import contextlib
import copy
import math

import pytest
import torch

from conftest import TINY_TRAIN_FLAGS
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


# ---------------------------------------------------------------------------------------------
# train.py's flags, run in this process (train.main) with spies on what the training step sees
# ---------------------------------------------------------------------------------------------

def train_in(folder, monkeypatch, *flags):
    """train.main(flags) in folder, as `python train.py flags` run there would."""
    import train
    monkeypatch.chdir(folder)
    train.main([*map(str, flags)])


def spy_on_training_loss(monkeypatch):
    """Every x0 that GaussianDiffusion.training_loss gets (Algorithm 1's clean images, after any flip)."""
    seen, real = [], GaussianDiffusion.training_loss

    def spy(self, model, x0, *args, **kwargs):
        seen.append(x0.detach().clone())
        return real(self, model, x0, *args, **kwargs)
    monkeypatch.setattr(GaussianDiffusion, "training_loss", spy)
    return seen


def save_copies(array, folder, names):
    """The same uint8 [H x W x 3] image saved as PNG under each name (lossless, so every copy reads the same)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(array).save(folder / f"{name}.png")


def flipped_or_not(images, reference):
    """For each image [C x S x S] of a batch: False if it is reference, True if it is reference mirrored
    left-right; anything else fails."""
    flags = []
    for image in images:
        same, mirrored = torch.equal(image, reference), torch.equal(image, reference.flip(-1))
        assert same != mirrored, "neither the image nor its mirror image (or a symmetric reference)"
        flags.append(mirrored)
    return flags


@pytest.mark.parametrize("hflip", ["on", "off"])
def test_hflip_on_mirrors_about_half_the_training_images_and_off_none(tmp_path, monkeypatch, hflip):
    """Every file is the same asymmetric 16x16 image, so each image Algorithm 1 trains on is either it or
    its mirror image: --hflip on flips each on its own coin (about half of them), --hflip off never."""
    import numpy as np
    from utils import to_model_range
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    save_copies(image, tmp_path / "pets" / "cat", range(4))
    save_copies(image, tmp_path / "pets" / "dog", range(4))
    reference = to_model_range(torch.as_tensor(image).permute(2, 0, 1))
    seen = spy_on_training_loss(monkeypatch)
    train_in(tmp_path, monkeypatch, "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "10",
             "--sample_every", "0", "--hflip", hflip)
    flags = [f for x0 in seen for f in flipped_or_not(x0, reference)]
    assert len(flags) == 40  # 10 steps of 4 images
    if hflip == "on":
        assert 10 <= sum(flags) <= 30, sum(flags)  # binomial(40, 1/2): 20 +- 3; the seed fixes the draw
        assert any(0 < sum(f for f in flipped_or_not(x0, reference)) < 4 for x0 in seen)  # per image, not per batch
    else:
        assert sum(flags) == 0


def test_hflip_flips_an_image_to_image_target_and_its_input_together(tmp_path, monkeypatch):
    """--task image_to_image: the input image is part of the example, so it mirrors with its target."""
    import numpy as np
    import cascade
    from utils import to_model_range
    rng = np.random.default_rng(2)
    target, given = (rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2))
    save_copies(target, tmp_path / "photos", range(8))
    save_copies(given, tmp_path / "sketches", range(8))
    seen, conds, real_conditioned = spy_on_training_loss(monkeypatch), [], cascade.conditioned
    monkeypatch.setattr(cascade, "conditioned", lambda model, cond, *rest: conds.append(cond.detach().clone())
                        or real_conditioned(model, cond, *rest))
    train_in(tmp_path, monkeypatch, "--task", "image_to_image", "--dataset_path", "photos", "--cond_path", "sketches",
             *TINY_TRAIN_FLAGS, "--max_steps", "8", "--sample_every", "0", "--hflip", "on")
    assert len(seen) == len(conds) == 8
    targets_flipped = [f for x0 in seen for f in flipped_or_not(x0, to_model_range(torch.as_tensor(target).permute(2, 0, 1)))]
    inputs_flipped = [f for c in conds for f in flipped_or_not(c, to_model_range(torch.as_tensor(given).permute(2, 0, 1)))]
    assert 0 < sum(targets_flipped) < len(targets_flipped)  # a mix, so the pairing below means something
    assert inputs_flipped == targets_flipped


def test_p_uncond_reaches_label_dropout_and_is_saved_and_p_uncond_0_warns_at_guided_sampling(tmp_path, monkeypatch):
    """--p_uncond is the drop probability CFG Algorithm 1 uses in every training step (guidance.drop_labels, with
    the "no label" index K = 2 here) and is saved for sample.py; a model trained with --p_uncond 0 never learned
    its "no label" prediction, so --guidance_scale on it warns (README: Classifier-free guidance)."""
    import train
    from conftest import make_image_folder, run_script
    make_image_folder(tmp_path / "pets", per_class=4)
    calls, real_drop = [], train.drop_labels
    monkeypatch.setattr(train, "drop_labels", lambda y, p, null, coins=None: calls.append((p, null, coins is not None))
                        or real_drop(y, p, null, coins=coins))
    for p in ("0.3", "0"):
        calls.clear()
        train_in(tmp_path, monkeypatch, "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "3",
                 "--sample_every", "0", "--p_uncond", p, "--run_name", f"p{p}")
        assert calls == [(float(p), 2, True)] * 3  # one call per step, with this run's p_uncond and K = 2 classes
        full = torch.load(tmp_path / f"checkpoints/p{p}.pt", weights_only=True)
        ema = torch.load(tmp_path / f"checkpoints/p{p}_ema.pt", weights_only=True)
        assert ema["p_uncond"] == full["p_uncond"] == full["config"]["p_uncond"] == float(p)
    warning = "warning: this model was trained without label dropout (--p_uncond 0"
    sample = ["--guidance_scale", "3", "--num_samples", "1", "--sampler", "ddim", "--steps", "2", "--device", "cpu"]
    guided = run_script("sample.py", "--ckpt", "checkpoints/p0_ema.pt", *sample, "--out", "p0.png", cwd=tmp_path)
    assert warning in guided.stdout and (tmp_path / "p0.png").is_file()
    assert "classifier-free guidance: scale 3" in guided.stdout
    trained = run_script("sample.py", "--ckpt", "checkpoints/p0.3_ema.pt", *sample, "--out", "p03.png", cwd=tmp_path)
    assert warning not in trained.stdout and "classifier-free guidance: scale 3" in trained.stdout


def fake_mnist(digits, labels):
    """Stands in for torchvision.datasets.MNIST: its data, targets and classes, and no download."""
    import torchvision

    class FakeMNIST:
        classes = list(torchvision.datasets.MNIST.classes)

        def __init__(self, root, train=True, download=False, **kwargs):
            self.data, self.targets = digits, labels
    return FakeMNIST


def test_builtin_mnist_is_28x28_digits_padded_to_32_one_channel_ten_classes_and_no_flips(tmp_path, monkeypatch):
    """--dataset mnist without the network: torchvision's MNIST is replaced by 20 random 28x28 "digits"
    with no zero pixel, so the zero border of a padded image tells padding from resizing."""
    import torchvision
    import torch.nn.functional as F
    from utils import to_model_range
    generator = torch.Generator().manual_seed(0)
    digits = torch.randint(1, 256, (20, 28, 28), generator=generator, dtype=torch.uint8)
    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist(digits, torch.arange(20) % 10))
    seen = spy_on_training_loss(monkeypatch)
    flags = [f for f in TINY_TRAIN_FLAGS]
    flags[flags.index("--image_size") + 1] = "32"
    train_in(tmp_path, monkeypatch, "--dataset", "mnist", *flags, "--max_steps", "2", "--sample_every", "0")
    full = torch.load(tmp_path / "checkpoints/mnist.pt", weights_only=True)
    # Ten classes in digit order, label d named d, as an .npz's (torchvision calls them '0 - zero', ...)
    assert full["class_names"] == [str(d) for d in range(10)]
    assert full["config"]["hflip"] == "off"  # auto: digits are not flipped
    assert full["model_config"]["in_channels"] == 1 and full["model_config"]["image_size"] == 32
    padded = to_model_range(F.pad(digits, (2, 2, 2, 2))[:, None])  # [20 x 1 x 32 x 32]
    assert len(seen) == 2
    for x0 in seen:
        assert x0.shape == (4, 1, 32, 32)
        for image in x0:  # each exactly one of the digits, padded (not resized, not mirrored)
            assert any(torch.equal(image, p) for p in padded)


def test_a_builtin_run_saved_with_torchvision_s_class_names_resumes_with_them(tmp_path, monkeypatch):
    """Runs from before the names were made plain ('0 - zero' ...) resume, keeping their own names."""
    digits = torch.randint(1, 256, (20, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    monkeypatch.setattr(__import__("torchvision").datasets, "MNIST", fake_mnist(digits, torch.arange(20) % 10))
    flags = [*TINY_TRAIN_FLAGS, "--sample_every", "0"]
    train_in(tmp_path, monkeypatch, "--dataset", "mnist", *flags, "--max_steps", "1")
    old_names = list(__import__("torchvision").datasets.MNIST.classes)
    for name in ("mnist.pt", "mnist_ema.pt"):
        state = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        torch.save(dict(state, class_names=old_names), tmp_path / "checkpoints" / name)
    train_in(tmp_path, monkeypatch, "--dataset", "mnist", "--resume", "--max_steps", "2", "--sample_every", "0")
    state = torch.load(tmp_path / "checkpoints" / "mnist.pt", weights_only=True)
    assert state["step"] == 2 and state["class_names"] == old_names


def test_builtin_class_names_are_plain_names_a_file_can_hold():
    from utils import plain_class_names
    assert plain_class_names(["0 - zero", "9 - nine"]) == ["0", "9"]
    assert plain_class_names(["T-shirt/top", "Ankle boot", "airplane"]) == ["T-shirt_top", "Ankle boot", "airplane"]


def test_channels_flag_overrides_the_folder_s_colour(tmp_path, monkeypatch):
    """--channels 1 trains a grayscale model on RGB images; --channels 3 an RGB one on grayscale images."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for folder, mode in (("colour", "RGB"), ("grey", "L")):
        for c in ("a", "b"):
            (tmp_path / folder / c).mkdir(parents=True)
            for i in range(3):
                shape = (16, 16, 3) if mode == "RGB" else (16, 16)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(tmp_path / folder / c / f"{i}.png")
    seen = spy_on_training_loss(monkeypatch)
    for folder, channels in (("colour", 1), ("grey", 3), ("colour", None), ("grey", None)):
        seen.clear()
        extra = ["--channels", channels] if channels else []
        train_in(tmp_path, monkeypatch, "--dataset_path", folder, *TINY_TRAIN_FLAGS, "--max_steps", "1",
                 "--sample_every", "0", "--run_name", f"{folder}{channels}", *extra)
        expected = channels or {"colour": 3, "grey": 1}[folder]  # auto: 3 if any image has colour
        ema = torch.load(tmp_path / f"checkpoints/{folder}{channels}_ema.pt", weights_only=True)
        assert ema["model_config"]["in_channels"] == ema["model_config"]["out_channels"] == expected, (folder, channels)
        assert seen[0].shape[1] == expected


def test_ema_decay_reaches_the_ema_update_and_is_saved(tmp_path, monkeypatch):
    """--ema_decay 0: the EMA takes the new weights whole at every step, so after training it equals them."""
    import train
    from conftest import make_image_folder
    make_image_folder(tmp_path / "pets", per_class=4)
    decays, real_update = [], train.update_ema
    monkeypatch.setattr(train, "update_ema", lambda ema, model, decay, step: decays.append(decay)
                        or real_update(ema, model, decay, step))
    train_in(tmp_path, monkeypatch, "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "3",
             "--sample_every", "0", "--ema_decay", "0", "--lr", "1e-3")
    assert decays == [0.0] * 3
    full = torch.load(tmp_path / "checkpoints/pets.pt", weights_only=True)
    assert full["config"]["ema_decay"] == 0.0
    assert full["ema"].keys() == full["model"].keys()
    for key, value in full["model"].items():
        assert torch.equal(full["ema"][key], value), key
    # and the weights did move, so the equality is not that of two untrained copies
    assert not torch.equal(full["model"]["output.2.weight"], torch.zeros_like(full["model"]["output.2.weight"]))
