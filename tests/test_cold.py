"""cold.py (Cold Diffusion, Bansal et al. 2022): the degradations start at the image and end where the
module says; a perfect restorer brings both samplers back to x_0 exactly; Algorithm 2 cancels an error
that every level keeps, where Algorithm 1 passes it on; the start mixture fits and samples; the
training loss; and train.py / sample.py end to end."""
import os

import pytest
import torch

from cold import DEGRADATIONS, ColdDiffusion, fit_start_mixture, sample_mixture
from conftest import TINY_TRAIN_FLAGS, assert_one_line_error, run_script
from utils import UsageError


def images(b=3, c=2, size=8, seed=0):
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_level_0_is_the_image_and_level_T_is_all_that_is_left(degradation):
    process, x = ColdDiffusion(degradation, timesteps=10, image_size=8), images()
    levels = lambda s: torch.full((len(x),), s, dtype=torch.long)
    assert torch.allclose(process.degrade(x, levels(0)), x, atol=1e-6)           # D(x_0, 0) = x_0
    end = process.degrade(x, levels(10))
    if degradation == "mask":
        assert (end == -1).all()                                                  # all black
    else:                                                                         # the channel means
        assert torch.allclose(end, x.mean(dim=(2, 3), keepdim=True).expand_as(x), atol=1e-5)
    # More levels, more destroyed: the distance from the image grows with s.
    distances = [(process.degrade(x, levels(s)) - x).abs().mean().item() for s in range(11)]
    assert all(a <= b + 1e-6 for a, b in zip(distances, distances[1:])) and distances[-1] > distances[1]
    # Each image of a batch gets its own level.
    mixed = process.degrade(x, torch.tensor([0, 5, 10]))
    for i, s in enumerate((0, 5, 10)):
        assert torch.allclose(mixed[i], process.degrade(x[i:i + 1], levels(s)[:1])[0], atol=1e-6)


@pytest.mark.parametrize("degradation", ["blur", "pixelate"])
def test_blur_and_pixelate_average_pixels_so_constants_stay_constant(degradation):
    process = ColdDiffusion(degradation, timesteps=10, image_size=8)
    assert torch.allclose(process.matrices.sum(dim=2), torch.ones(11, 8), atol=1e-6)  # each row averages
    flat = torch.full((1, 1, 8, 8), 0.3)
    for s in range(11):
        assert torch.allclose(process.degrade(flat, torch.tensor([s])), flat, atol=1e-6)


@pytest.mark.parametrize("degradation", DEGRADATIONS)
@pytest.mark.parametrize("sampler", ["improved", "naive"])
def test_a_perfect_restorer_brings_both_algorithms_back_to_x0_exactly(degradation, sampler):
    process, x0 = ColdDiffusion(degradation, timesteps=10, image_size=8), images()
    calls = []

    def perfect(xt, t, y):
        calls.append(int(t[0]))
        return x0
    x_T = process.degrade(x0, torch.full((3,), 10, dtype=torch.long))
    out = process.sample(perfect, x_T, sampler=sampler, progress=False)
    assert torch.allclose(out, x0, atol=1e-6)
    # The network sees code t = s - 1, from T-1 down to 0; Algorithm 2 skips levels where it would do nothing.
    skipped = process.no_op_levels if sampler == "improved" else set()
    assert calls == [s - 1 for s in range(10, 0, -1) if s not in skipped]


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_algorithm_2_skips_exactly_the_levels_where_its_step_changes_nothing(degradation):
    """Pixelate (block counts) and mask (square sides) have fewer distinct operators than levels when
    T >= S. Skipping those levels must give the full loop's result with fewer network calls."""
    process, x0 = ColdDiffusion(degradation, timesteps=20, image_size=8), images()
    basis = torch.eye(64).view(64, 1, 8, 8)  # D applied to every one-hot image: the whole operator
    level = lambda s: torch.full((64,), s, dtype=torch.long)
    same = [torch.equal(process.degrade(basis, level(s)), process.degrade(basis, level(s - 1))) for s in range(1, 21)]
    assert process.no_op_levels == {s for s in range(1, 21) if same[s - 1]}
    assert (len(process.no_op_levels) > 0) == (degradation in ("pixelate", "mask"))
    calls = []

    def restorer(xt, t, y):  # imperfect, and different at every level
        calls.append(int(t[0]))
        return torch.tanh(xt * (1 + t.view(-1, 1, 1, 1) / 20) + 0.1)
    x = x_T = process.degrade(x0, torch.full((3,), 20, dtype=torch.long))
    for s in range(20, 0, -1):  # Algorithm 2 at every level, as printed
        level = torch.full((3,), s, dtype=torch.long)
        x0_hat = restorer(x, level - 1, None).clamp(-1, 1)
        x = x - process.degrade(x0_hat, level) + process.degrade(x0_hat, level - 1)
    calls.clear()
    assert torch.allclose(process.sample(restorer, x_T, progress=False), x, atol=1e-6)
    assert len(calls) == 20 - len(process.no_op_levels)


def test_algorithm_2_cancels_an_error_every_level_keeps_and_algorithm_1_passes_it_on():
    """A restorer that is always off by the same constant c: blur keeps constants (rows average), so
    D(x0 + c, s) - D(x0 + c, s-1) = D(x0, s) - D(x0, s-1) and Algorithm 2 still lands on x_0, while
    Algorithm 1 ends at D(x0 + c, 0) = x0 + c. The paper's reason for Algorithm 2."""
    process, x0 = ColdDiffusion("blur", timesteps=10, image_size=8), images() * 0.5
    off = lambda xt, t, y: x0 + 0.2
    x_T = process.degrade(x0, torch.full((3,), 10, dtype=torch.long))
    assert torch.allclose(process.sample(off, x_T, sampler="improved", progress=False), x0, atol=1e-5)
    assert torch.allclose(process.sample(off, x_T, sampler="naive", progress=False), x0 + 0.2, atol=1e-5)


def test_training_loss_restores_x0_from_level_t_plus_1():
    process, x0 = ColdDiffusion("pixelate", timesteps=10, image_size=8), images(b=64)
    seen = {}

    def oracle(xt, t, y):
        seen["xt"], seen["t"] = xt, t
        return x0
    losses, t = process.training_loss(oracle, x0)
    assert losses.shape == (64,) and torch.equal(losses, torch.zeros(64))
    assert t.min() >= 0 and t.max() <= 9 and len(set(t.tolist())) > 5
    assert torch.equal(seen["xt"], process.degrade(x0, t + 1))                   # x_t = D(x_0, t + 1)
    wrong = lambda xt, t_, y: torch.zeros_like(x0)
    assert torch.allclose(process.training_loss(wrong, x0, t=t)[0], x0.abs().mean(dim=(1, 2, 3)))  # l1


def test_the_start_mixture_finds_two_clusters_and_samples_from_them():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(300, 3, generator=g) * 0.05 + 0.5, torch.randn(100, 3, generator=g) * 0.05 - 0.5])
    mixture = fit_start_mixture(points, components=2)
    order = sorted(range(2), key=lambda k: mixture["means"][k][0])
    assert [round(mixture["weights"][k], 2) for k in order] == [0.25, 0.75]
    assert torch.allclose(torch.tensor([mixture["means"][k] for k in order]), torch.tensor([[-0.5] * 3, [0.5] * 3]),
                          atol=0.02)
    draws = sample_mixture(mixture, 4000, torch.Generator().manual_seed(1))
    assert draws.shape == (4000, 3) and abs((draws[:, 0] > 0).float().mean().item() - 0.75) < 0.03


def test_mask_cannot_generate_and_bad_settings_are_usage_errors():
    with pytest.raises(UsageError, match="--degradation mask cannot generate"):
        ColdDiffusion("mask", 10, 8).start_images(2, 1)
    with pytest.raises(UsageError, match="--degradation smear"):
        ColdDiffusion("smear", 10, 8)
    with pytest.raises(UsageError, match="l1 or l2"):
        ColdDiffusion("blur", 10, 8, loss="huber")


def test_train_and_sample_a_cold_model_end_to_end(tmp_path, image_folder):
    common = [*TINY_TRAIN_FLAGS, "--max_steps", "2", "--sample_every", "2", "--process", "cold"]
    common[common.index("--timesteps") + 1] = "6"
    result = run_script("train.py", "--dataset_path", image_folder, *common, "--run_name", "blurry", cwd=tmp_path)
    assert "cold diffusion (cold.py): blur, T=6 levels, restores x_0 with l1 loss" in result.stdout
    state = torch.load(tmp_path / "checkpoints" / "blurry_ema.pt", weights_only=True)
    assert state["process"] == "cold" and "diffusion_config" not in state
    config = state["cold_config"]
    assert (config["degradation"], config["timesteps"], config["loss"]) == ("blur", 6, "l1")
    assert len(config["start_mixture"]["means"][0]) == 3  # a mixture over the 3 channel means
    assert (tmp_path / "samples" / "blurry" / "step_0000002.png").is_file()

    sampled = run_script("sample.py", "--ckpt", "checkpoints/blurry_ema.pt", "--num_samples", "2", "--gif",
                         "cold.gif", "--gif_frames", "3", cwd=tmp_path)
    assert "6 network calls each, improved sampler" in sampled.stdout and (tmp_path / "cold.gif").is_file()
    assert (tmp_path / "samples" / "blurry_ema.png").is_file()
    run_script("sample.py", "--ckpt", "checkpoints/blurry_ema.pt", "--num_samples", "1", "--cold_sampler", "naive",
               "--out", "naive.png", cwd=tmp_path)
    restored = run_script("sample.py", "--ckpt", "checkpoints/blurry.pt", "--cold_restore", image_folder / "cat",
                          "--cold_level", "4", "--num_samples", "3", cwd=tmp_path)
    assert "3 images degraded to level 4 of 6 and restored" in restored.stdout

    masked = run_script("train.py", "--dataset_path", image_folder, *common, "--degradation", "mask", "--run_name",
                        "masked", cwd=tmp_path)
    assert "degraded / restored / original rows" in masked.stdout
    assert "sample.py --ckpt checkpoints/masked_ema.pt --cold_restore <images>" in masked.stdout  # it cannot generate

    def fails(*args, script="sample.py"):
        return run_script(script, *args, cwd=tmp_path, check=False)
    assert_one_line_error(fails("--ckpt", "checkpoints/masked_ema.pt"), "cannot generate", "--cold_restore")
    assert_one_line_error(fails("--ckpt", "checkpoints/blurry_ema.pt", "--sampler", "ddim"), "--sampler ddim",
                          "Cold Diffusion")
    # A class-conditional Cold model draws the classes asked for, one row each, as Gaussian models do.
    chosen = run_script("sample.py", "--ckpt", "checkpoints/blurry_ema.pt", "--class_name", "dog", "--num_samples", "2",
                        "--out", "dogs.png", "--individual_dir", "dogs", cwd=tmp_path)
    assert "grid of 2 samples" in chosen.stdout and sorted(os.listdir(tmp_path / "dogs"))[0].endswith("_dog.png")
    assert_one_line_error(fails("--ckpt", "checkpoints/blurry_ema.pt", "--class_name", "cow"), "--class_name cow",
                          "cat, dog")
    assert_one_line_error(fails("--ckpt", "checkpoints/blurry_ema.pt", "--cold_level", "3"),
                          "--cold_level", "--cold_restore")  # generation runs every level: it was ignored
    assert_one_line_error(fails("--ckpt", "checkpoints/blurry_ema.pt", "--spacing", "quadratic"), "--spacing",
                          "Cold Diffusion")
    assert_one_line_error(fails("--ckpt", "checkpoints/blurry_ema.pt", "--batch_size", "0"), "--batch_size")
    assert_one_line_error(fails("--ckpt", "checkpoints/blurry_ema.pt", "--gif", "g.png"), "--gif g.png", ".gif")
    assert_one_line_error(fails("--ckpt", "checkpoints/blurry_ema.pt", "--cold_restore", image_folder / "cat", "--gif",
                                "r.gif"), "--cold_restore writes one grid", "--gif")  # was ignored
    assert_one_line_error(fails("--ckpt", "checkpoints/blurry_ema.pt", "--gif", "g.gif", "--gif_frames", "0"),
                          "--gif_frames")
    assert_one_line_error(fails("--ckpt", "checkpoints/blurry_ema.pt", "--classifier", "x.pt", "--reference_path",
                                image_folder, "--csv", "x.csv", script="tools/sampler_sweep.py"),
                          "a Cold Diffusion model", "sample.py")
    assert_one_line_error(fails("--dataset_path", image_folder, *common, "--learn_sigma", script="train.py"),
                          "--process cold: --learn_sigma")
