"""Issue 3 end to end through the command line: learned variances, the hybrid loss, v-prediction,
importance sampling of t, and every sampler of sample.py (DDIM, respaced DDPM, interpolation, inversion)."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN_FLAGS, assert_one_line_error, run_script

IMPROVED_FLAGS = ["--learn_sigma", "--loss", "hybrid", "--prediction", "v", "--min_snr_gamma", "5",
                  "--timestep_sampler", "loss-aware"]


@pytest.fixture(scope="module")
def improved_run(tmp_path_factory):
    """One tiny run with every Improved DDPM option, shared by the tests below (T = 20)."""
    from conftest import make_image_folder
    root = tmp_path_factory.mktemp("improved")
    folder = make_image_folder(root / "pets")
    run_script("train.py", "--dataset_path", folder, *TINY_TRAIN_FLAGS, *IMPROVED_FLAGS, "--max_steps", "4",
               "--save_every", "2", "--sample_every", "4", cwd=root)
    return root, folder


def test_learned_sigma_hybrid_v_run_saves_everything_sampling_needs(improved_run):
    root, _ = improved_run
    ema = torch.load(root / "checkpoints" / "pets_ema.pt", map_location="cpu", weights_only=True)
    full = torch.load(root / "checkpoints" / "pets.pt", map_location="cpu", weights_only=True)
    assert ema["diffusion_config"] == dict(timesteps=20, schedule="linear", loss="hybrid", variance="learned",
                                           prediction="v", learn_sigma=True, min_snr_gamma=5.0)
    assert ema["model_config"]["out_channels"] == 6  # 3 channels of v and 3 of variance values
    assert ema["ema"]["output.2.weight"].shape[0] == 6
    history = full["timestep_sampler"]
    assert history["kind"] == "loss-aware" and history["loss_counts"].sum().item() == 4 * 4  # 4 steps x batch 4
    assert (root / "samples" / "pets" / "step_0000004.png").is_file()


def test_resume_keeps_the_importance_sampling_history(improved_run, tmp_path):
    root, folder = improved_run
    import shutil
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    result = run_script("train.py", "--dataset_path", folder, "--resume", "--max_steps", "6", "--sample_every", "0",
                        cwd=tmp_path)
    assert "resuming at step 4" in result.stdout and "loss hybrid" in result.stdout
    full = torch.load(tmp_path / "checkpoints" / "pets.pt", map_location="cpu", weights_only=True)
    assert full["timestep_sampler"]["loss_counts"].sum().item() == 6 * 4


def test_amp_samples_in_bf16_close_to_fp32_and_refuses_fp16_on_a_cpu(improved_run, tmp_path):
    """sample.py --amp bf16: the network under autocast, the same grid layout, pixels close to fp32's from the
    same noise (deterministic DDIM); --amp fp16 on a CPU is one line naming the flag."""
    root, _ = improved_run
    grids = {}
    for amp in ("off", "bf16"):
        result = run_script("sample.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--num_samples", "2",
                            "--sampler", "ddim", "--steps", "5", "--amp", amp, "--out", tmp_path / f"{amp}.png",
                            "--device", "cpu", cwd=tmp_path)
        grids[amp] = torch.from_numpy(np.array(Image.open(tmp_path / f"{amp}.png"))).float()
    assert "--amp bf16: the network in bf16 autocast" in result.stdout
    assert grids["off"].shape == grids["bf16"].shape
    difference = (grids["off"] - grids["bf16"]).abs()
    assert difference.mean() < 8  # of 255: small rounding, not other images
    assert difference.max() > 0   # but not none: the flag did change the arithmetic
    result = run_script("sample.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--amp", "fp16", "--device",
                        "cpu", cwd=tmp_path, check=False)
    assert_one_line_error(result, "--amp fp16")


@pytest.mark.parametrize("flags,calls", [
    (["--sampler", "ddim", "--steps", "5"], "5 of 20 steps"),
    (["--sampler", "ddim", "--steps", "5", "--eta", "1", "--spacing", "quadratic"], "5 of 20 steps (quadratic"),
    (["--steps", "5"], "DDPM (Algorithm 2), 5 of 20 steps"),          # respaced, learned variances
    (["--steps", "5", "--variance", "posterior"], "5 of 20 steps"),
    ([], "DDPM (Algorithm 2), 20 of 20 steps"),
])
def test_every_sampler_draws_from_the_checkpoint_alone(improved_run, tmp_path, flags, calls):
    root, _ = improved_run
    result = run_script("sample.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--num_samples", "2",
                        "--out", tmp_path / "grid.png", *flags, cwd=tmp_path)
    assert calls in result.stdout
    assert Image.open(tmp_path / "grid.png").size == (2 + 2 * 18, 2 + 2 * 18)  # 2 classes x 2 images


def test_interpolation_strip_and_gif_with_ddim(improved_run, tmp_path):
    root, _ = improved_run
    ckpt = root / "checkpoints" / "pets_ema.pt"
    result = run_script("sample.py", "--ckpt", ckpt, "--interpolate", "6", "--num_samples", "3", "--steps", "4",
                        cwd=tmp_path)
    assert "3 interpolation rows of 6" in result.stdout
    assert Image.open(tmp_path / "samples" / "pets_ema_interpolation.png").size == (2 + 6 * 18, 2 + 3 * 18)
    run_script("sample.py", "--ckpt", ckpt, "--sampler", "ddim", "--steps", "10", "--num_samples", "2",
               "--gif", "ddim.gif", "--gif_frames", "5", cwd=tmp_path)
    assert Image.open(tmp_path / "ddim.gif").n_frames == 6  # the first step and every 2nd of 10


def test_inversion_writes_originals_over_reconstructions(improved_run, tmp_path):
    root, folder = improved_run
    result = run_script("sample.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--invert", folder,
                        "--num_samples", "3", "--steps", "20", cwd=tmp_path)
    assert "3 images -> x_T -> images" in result.stdout and "mean absolute error" in result.stdout
    assert Image.open(tmp_path / "samples" / "pets_ema_inversion.png").size == (2 + 3 * 18, 2 + 2 * 18)
    # a class-conditional model must know each image's class: a loose file in an unknown folder is refused
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (16, 16)).save(loose / "x.png")
    result = run_script("sample.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--invert", loose / "x.png",
                        cwd=tmp_path, check=False)
    assert_one_line_error(result, "--invert", "not one of its classes")
    # A broken file among the images is skipped with a warning naming it, as training does.
    shutil.copytree(folder, tmp_path / "with_bad")
    (tmp_path / "with_bad" / "cat" / "00_broken.png").write_bytes(b"not a png")
    result = run_script("sample.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--invert", tmp_path / "with_bad",
                        "--num_samples", "3", "--steps", "5", "--out", tmp_path / "inv.png", cwd=tmp_path)
    assert "skipping unreadable image" in result.stderr and "00_broken.png" in result.stderr
    assert "3 images -> x_T -> images" in result.stdout
    # An output under a file cannot be written: said before any sampling, not after it.
    for flag in ("--out", "--gif", "--individual_dir"):
        target = loose / "x.png" / ("grid.png" if flag == "--out" else "r.gif" if flag == "--gif" else "each")
        result = run_script("sample.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", flag, target,
                            cwd=tmp_path, check=False)
        assert_one_line_error(result, f"{flag} {target}", "is a file")
    # A folder named like the file: refused before sampling too (saving into it failed after).
    (tmp_path / "looks_like.png").mkdir()
    result = run_script("sample.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--out", tmp_path / "looks_like.png",
                        cwd=tmp_path, check=False)
    assert_one_line_error(result, "--out", "looks_like.png: a folder of that name is there")


@pytest.mark.parametrize("flags,fragments", [
    (["--eta", "0.5"], ("--eta", "--sampler ddim")),
    (["--sampler", "ddim", "--steps", "21"], ("--steps 21", "T = 20")),
    (["--steps", "0"], ("--steps 0",)),
    (["--interpolate", "1"], ("--interpolate 1",)),
    (["--interpolate", "4", "--eta", "1"], ("--interpolate", "eta")),
    (["--sampler", "ddim", "--eta", "1.5"], ("--eta 1.5", "between 0")),
    (["--guidance_scale", "nan"], ("--guidance_scale", "finite")),
    (["--sampler", "ddim", "--variance", "beta"], ("--variance", "--eta")),  # DDIM would ignore it
    (["--out", "grid"], ("--out grid", "name a .png, .jpg, .jpeg or .webp file")),  # before the sampling, not after it
    (["--out", "."], ("--out .", ".png")),
    (["--gif", "reverse.png"], ("--gif reverse.png", ".gif")),  # it saved one still frame
    (["--cond_images", "."], ("--cond_images", "takes no input images")),  # was ignored
    (["--interpolate", "4", "--individual_dir", "each"], ("--interpolate", "--individual_dir")),
    (["--invert", ".", "--class_label", "0"], ("--invert", "--class_label")),
    (["--invert", "no/such/folder"], ("--invert no/such/folder",)),
    (["--variance", "learned"], ("--variance learned",)),
    (["--seed", "4294967296"], ("--seed 4294967296", "2^32")),  # a numpy traceback
    (["--gif_frames", "5"], ("--gif_frames", "--gif")),  # did nothing without --gif
    (["--classifier_scale", "2"], ("--classifier_scale", "--classifier_ckpt")),
    (["--realesrgan_weights", "x.pth"], ("--realesrgan_weights", "--upscale_mode realesrgan")),
    (["--upscale_mode", "realesrgan", "--realesrgan_weights", "x.pth"], ("--realesrgan_weights x.pth", "no such file")),
])
def test_bad_sampler_flags_are_one_line_errors(improved_run, tmp_path, flags, fragments):
    root, _ = improved_run
    ckpt = root / "checkpoints" / "pets_ema.pt"
    if flags == ["--variance", "learned"]:  # only a model without learned variances refuses this
        run_script("train.py", "--dataset_path", improved_run[1], *TINY_TRAIN_FLAGS, "--max_steps", "1",
                   "--sample_every", "0", cwd=tmp_path)
        ckpt = tmp_path / "checkpoints" / "pets_ema.pt"
    result = run_script("sample.py", "--ckpt", ckpt, *flags, cwd=tmp_path, check=False)
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("flags,fragments", [
    (["--learn_sigma"], ("--learn_sigma", "--loss hybrid")),
    (["--loss", "hybrid"], ("--loss hybrid", "--learn_sigma")),
    (["--min_snr_gamma", "-1"], ("--min_snr_gamma",)),
    (["--grad_clip", "0"], ("--grad_clip 0.0", "positive")),  # clip_grad_norm_ would zero every gradient
    (["--warmup_steps", "-1"], ("--warmup_steps -1",)),
    (["--weight_decay", "-0.1"], ("--weight_decay -0.1",)),
    (["--num_workers", "-1"], ("--num_workers -1",)),
    (["--channel_mults", "1", "0"], ("--channel_mults 1 0", "at least 1")),  # a convolution with 0 channels
    (["--attention_resolutions", "4"], ("--attention_resolutions 4", "16 8")),  # 16x16, 2 levels: never used
    (["--task", "classifier", "--prediction", "v"], ("--task classifier: --prediction v", "cross-entropy")),
    (["--loss", "kl", "--learn_sigma", "--min_snr_gamma", "5"], ("--loss kl --min_snr_gamma", "ignores")),
    (["--task", "super_resolution", "--low_res", "8", "--aug_max_t", "0", "--sample_aug_t", "2"],
     ("--sample_aug_t 2", "--aug_max_t 0")),  # was ignored
    (["--task", "super_resolution", "--low_res", "8", "--aug_max_t", "3", "--sample_aug_t", "5"],
     ("--sample_aug_t 5", "above --aug_max_t 3")),  # a level never trained on
    (["--lr", "nan"], ("--lr nan", "finite")),                 # an AdamW traceback
    (["--max_minutes", "nan"], ("--max_minutes nan", "finite")),  # lr 0 throughout, and no time limit
    (["--min_snr_gamma", "nan"], ("--min_snr_gamma nan", "finite")),  # skipped every step, saved untrained weights
    (["--seed", "-1"], ("--seed -1", "2^32")),                 # a numpy traceback
    (["--num_samples", "0"], ("--num_samples 0", "at least 1")),  # failed at the first grid
    (["--sample_every", "-1"], ("--sample_every -1",)),        # drew a grid every step
    (["--run_name", "a/b"], ("--run_name 'a/b'", "plain file name")),  # escaped the overwrite check
    (["--run_name", "pets_ema"], ("--run_name 'pets_ema'", "another run's files")),
    (["--dataset_path", ""], ("--dataset_path is empty",)),   # trained on the built-in shapes
])
def test_bad_training_combinations_are_one_line_errors(tmp_path, image_folder, flags, fragments):
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, *flags, cwd=tmp_path,
                        check=False)
    assert_one_line_error(result, *fragments)
