"""Classes, guidance, super-resolution, cascades, image-to-image and upscaling through the CLI, on tiny data."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (TINY_TRAIN_FLAGS, assert_one_line_error, correlation, make_image_folder, record_step_noise,
                      run_script)

STEPS = ["--max_steps", "3", "--save_every", "3", "--sample_every", "3"]


def flags(**overrides):
    """TINY_TRAIN_FLAGS with some values replaced."""
    out = list(TINY_TRAIN_FLAGS)
    for name, value in overrides.items():
        out[out.index(f"--{name}") + 1] = str(value)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A class-conditional base model at 8x8, a noisy classifier, and an 8 -> 16 super-resolution model."""
    root = tmp_path_factory.mktemp("conditioning")
    make_image_folder(root / "pets", classes=("cat", "dog", "fox"), per_class=4)
    run_script("train.py", "--dataset_path", "pets", *flags(image_size=8), *STEPS, cwd=root)
    result = run_script("train.py", "--dataset_path", "pets", "--task", "classifier", *flags(image_size=8), *STEPS,
                        cwd=root)
    assert "accuracy on noisy images, t=0:" in result.stdout
    result = run_script("train.py", "--dataset_path", "pets", "--task", "super_resolution", "--low_res", "8",
                        "--sample_steps", "5", *TINY_TRAIN_FLAGS, *STEPS, cwd=root)
    assert "input / sample / target rows" in result.stdout
    return root


def test_checkpoints_say_what_they_are(trained):
    load = lambda name: torch.load(trained / "checkpoints" / name, map_location="cpu", weights_only=True)  # noqa: E731
    base, classifier, sr = load("pets_ema.pt"), load("pets_classifier_ema.pt"), load("pets_sr_ema.pt")
    assert base["task"] == "diffusion" and base["p_uncond"] == 0.1 and base["model_config"]["num_classes"] == 3
    assert classifier["task"] == "classifier" and classifier["class_names"] == ["cat", "dog", "fox"]
    assert classifier["model_config"]["num_classes"] == 3
    assert sr["task"] == "super_resolution" and sr["class_names"] == [] and sr["model_config"]["cond_channels"] == 3
    # T = 20: augmentation levels default to T/10 in training and T/50 at sampling, saved for sample.py.
    assert sr["conditioning"] == {"low_res": 8, "aug_max_t": 2, "sample_aug_t": 0}


def spy_on_guidance(monkeypatch, name):
    """Wrap guidance.classifier_free_guidance or guidance.classifier_guidance (sample.py imports them when it
    runs in this process): every call of the guided network or cond_fn they return appends its scale."""
    import guidance
    calls, real = [], getattr(guidance, name)

    def wrapped(network, scale, *rest):
        inner = real(network, scale, *rest)
        return lambda *args, **kwargs: calls.append(scale) or inner(*args, **kwargs)
    monkeypatch.setattr(guidance, name, wrapped)
    return calls


def test_class_choice_and_classifier_free_guidance(trained, tmp_path, monkeypatch):
    guided_calls = spy_on_guidance(monkeypatch, "classifier_free_guidance")
    result = run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_ema.pt", "--class_name", "fox", "dog",
                        "--num_samples", "3", "--guidance_scale", "3", "--sampler", "ddim", "--steps", "4",
                        "--out", tmp_path / "guided.png", "--individual_dir", tmp_path / "each", cwd=tmp_path)
    assert "classifier-free guidance: scale 3 (1 = none; CFG paper's w = 2)" in result.stdout
    assert Image.open(tmp_path / "guided.png").size == (2 + 3 * 10, 2 + 2 * 10)   # 2 rows (classes) of 3
    assert sorted(p.name for p in (tmp_path / "each").iterdir())[0] == "sample_00000_fox.png"
    assert guided_calls == [3.0] * 4  # the guided network, at scale 3, at each of the 4 DDIM steps
    run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_ema.pt", "--class_label", "2",
               "--num_samples", "2", "--steps", "3", "--out", tmp_path / "label.png", cwd=tmp_path)
    assert Image.open(tmp_path / "label.png").size == (2 + 2 * 10, 12)
    bad = run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_ema.pt", "--class_name", "cow",
                     cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--class_name cow", "valid names: cat, dog, fox")


def test_classifier_guidance_with_both_samplers(trained, tmp_path, monkeypatch):
    gradient_calls = spy_on_guidance(monkeypatch, "classifier_guidance")
    ckpt, clf = trained / "checkpoints" / "pets_ema.pt", trained / "checkpoints" / "pets_classifier_ema.pt"
    for sampler in (["--steps", "4"], ["--sampler", "ddim", "--steps", "4"]):
        result = run_script("sample.py", "--ckpt", ckpt, "--classifier_ckpt", clf, "--classifier_scale", "5",
                            "--num_samples", "2", "--out", tmp_path / "cg.png", *sampler, cwd=tmp_path)
        assert "classifier guidance: scale 5" in result.stdout
        assert gradient_calls == [5.0] * 4  # cond_fn at each of the 4 steps, DDPM's (Alg. 1) and DDIM's (Alg. 2)
        gradient_calls.clear()
        assert Image.open(tmp_path / "cg.png").size == (2 + 2 * 10, 2 + 3 * 10)
    # Scale 0 is no guidance: the same samples as without the classifier (loading it draws no noise).
    for flags, out in (([], "plain.png"), (["--classifier_ckpt", clf, "--classifier_scale", "0"], "scale0.png")):
        run_script("sample.py", "--ckpt", ckpt, *flags, "--num_samples", "2", "--steps", "4", "--out", tmp_path / out,
                   cwd=tmp_path)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(Image.open(tmp_path / "scale0.png")))
    bad = run_script("sample.py", "--ckpt", clf, cwd=tmp_path, check=False)
    assert_one_line_error(bad, "noisy classifier", "--classifier_ckpt")
    bad = run_script("sample.py", "--ckpt", ckpt, "--classifier_ckpt", ckpt, cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--classifier_ckpt", "not a classifier")


def test_cascade_base_then_super_resolution(trained, tmp_path):
    result = run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_ema.pt", "--num_samples", "2",
                        "--sr_ckpt", trained / "checkpoints" / "pets_sr_ema.pt", "--steps", "4",
                        "--out", tmp_path / "base.png", cwd=tmp_path)
    assert "upscaled x2 to 16x16 by the SR model" in result.stdout
    assert Image.open(tmp_path / "base.png").size == (2 + 2 * 10, 2 + 3 * 10)      # 8x8 base samples
    assert Image.open(tmp_path / "base_x2.png").size == (2 + 2 * 18, 2 + 3 * 18)   # 16x16 from the SR model
    # The base grid is the one the base model draws alone with this seed: loading the SR model draws no noise.
    run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_ema.pt", "--num_samples", "2", "--steps", "4",
               "--out", tmp_path / "alone.png", cwd=tmp_path)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "base.png")), np.asarray(Image.open(tmp_path / "alone.png")))
    for flags, fragments in ((["--upscale", "3"], ("--upscale 3", "8x8 samples into 16x16 (x2)")),
                             (["--steps", "50"], ("--steps 50",)),
                             (["--upscale_mode", "bicubic"], ("--sr_ckpt", "--upscale_mode bicubic"))):  # SR unused
        bad = run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_ema.pt", "--sr_ckpt",
                         trained / "checkpoints" / "pets_sr_ema.pt", *flags, cwd=tmp_path, check=False)
        assert_one_line_error(bad, *fragments)
    bad = run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_ema.pt", "--sr_ckpt",
                     trained / "checkpoints" / "pets_ema.pt", cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--sr_ckpt", "not a super-resolution model")


def test_super_resolution_of_your_own_images(trained, tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "big").mkdir()
    for i in range(3):
        Image.new("RGB", (9 + i, 9), (40 * i, 90, 200)).save(tmp_path / "small" / f"{i}.png")
        Image.new("RGB", (24, 20 + i), (40 * i, 90, 200)).save(tmp_path / "big" / f"{i}.png")
    result = run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_sr_ema.pt", "--cond_images",
                        tmp_path / "small", "--steps", "4", "--out", tmp_path / "sr.png", cwd=tmp_path)
    assert "3 inputs -> outputs" in result.stdout and "rows: input (nearest), bicubic, SR model:" in result.stdout
    assert Image.open(tmp_path / "sr.png").size == (2 + 3 * 18, 2 + 3 * 18)   # three rows of 16x16 images
    # Inputs big enough to hold the output's detail are shrunk to the SR input and shown as the truth too.
    result = run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_sr_ema.pt", "--cond_images",
                        tmp_path / "big", "--steps", "4", "--out", tmp_path / "sr_big.png", cwd=tmp_path)
    assert "original at 16x16" in result.stdout and "PSNR against the originals: bicubic" in result.stdout
    assert Image.open(tmp_path / "sr_big.png").size == (2 + 3 * 18, 2 + 4 * 18)
    bad = run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_sr_ema.pt", cwd=tmp_path, check=False)
    assert_one_line_error(bad, "needs input images", "--cond_images")
    for flags in (["--interpolate", "4"], ["--class_label", "0"], ["--gif", "g.gif"]):  # each was ignored
        bad = run_script("sample.py", "--ckpt", trained / "checkpoints" / "pets_sr_ema.pt", "--cond_images",
                         tmp_path / "small", *flags, cwd=tmp_path, check=False)
        assert_one_line_error(bad, "super_resolution model's outputs follow --cond_images", flags[0])
    # The tools that sample from noise alone refuse it by name, rather than fail inside the network.
    bad = run_script("tools/nll.py", "--ckpt", trained / "checkpoints" / "pets_sr_ema.pt", "--dataset_path",
                     tmp_path / "big", cwd=tmp_path, check=False)
    assert_one_line_error(bad, "pets_sr_ema.pt: a --task super_resolution model", "sample.py")


def test_upscaling_modes(trained, tmp_path):
    ckpt = trained / "checkpoints" / "pets_ema.pt"
    run_script("sample.py", "--ckpt", ckpt, "--num_samples", "1", "--steps", "3", "--upscale", "3",
               "--upscale_mode", "nearest", "--out", tmp_path / "g.png", cwd=tmp_path)
    assert Image.open(tmp_path / "g_x3.png").size == (2 + 1 * 26, 2 + 3 * 26)
    bad = run_script("sample.py", "--ckpt", ckpt, "--upscale_mode", "realesrgan", "--realesrgan_weights",
                     tmp_path / "nope.pth", cwd=tmp_path, check=False)
    assert_one_line_error(bad, "nope.pth", "download RealESRGAN_x4plus.pth")
    assert not (tmp_path / "samples").exists()  # refused before any sampling


def test_guidance_needs_a_class_conditional_model(tmp_path):
    make_image_folder(tmp_path / "flat", classes=("only",), per_class=4)
    shutil.move(str(tmp_path / "flat" / "only"), str(tmp_path / "faces"))
    run_script("train.py", "--dataset_path", "faces", *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0",
               cwd=tmp_path)
    bad = run_script("sample.py", "--ckpt", "checkpoints/faces_ema.pt", "--guidance_scale", "3", cwd=tmp_path,
                     check=False)
    assert_one_line_error(bad, "--guidance_scale 3", "not class-conditional")
    bad = run_script("train.py", "--dataset_path", "faces", "--task", "classifier", *TINY_TRAIN_FLAGS, cwd=tmp_path,
                     check=False)
    assert_one_line_error(bad, "--task classifier", "no classes")
    bad = run_script("train.py", "--dataset_path", "faces", "--task", "super_resolution", *TINY_TRAIN_FLAGS,
                     cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--low_res")
    bad = run_script("train.py", "--dataset_path", "faces", "--sample_steps", "0", *TINY_TRAIN_FLAGS,
                     cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--sample_steps 0")


def test_image_to_image_from_paired_folders(tmp_path):
    make_image_folder(tmp_path / "raw", classes=("a", "b"), per_class=3)
    (tmp_path / "photos").mkdir()
    (tmp_path / "sketches").mkdir()
    for i, path in enumerate(sorted((tmp_path / "raw").rglob("*.*"))):
        image = Image.open(path).convert("RGB")
        image.save(tmp_path / "photos" / f"{i}.png")
        image.convert("L").save(tmp_path / "sketches" / f"{i}.jpg")   # same name, other extension
    result = run_script("train.py", "--task", "image_to_image", "--dataset_path", "photos", "--cond_path", "sketches",
                        *TINY_TRAIN_FLAGS, *STEPS, "--num_samples", "16", cwd=tmp_path)  # more than the 6 pairs
    assert "run photos_i2i: 6 images" in result.stdout and "input / sample / target rows" in result.stdout
    ema = torch.load(tmp_path / "checkpoints" / "photos_i2i_ema.pt", map_location="cpu", weights_only=True)
    assert ema["task"] == "image_to_image" and ema["model_config"]["cond_channels"] == 1
    run_script("sample.py", "--ckpt", "checkpoints/photos_i2i_ema.pt", "--cond_images", "sketches", "--steps", "3",
               "--out", "out.png", cwd=tmp_path)
    assert Image.open(tmp_path / "out.png").size == (2 + 6 * 18, 2 + 2 * 18)    # 6 inputs above 6 outputs
    bad = run_script("train.py", "--task", "image_to_image", "--dataset_path", "photos", *TINY_TRAIN_FLAGS,
                     cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--cond_path")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "0.txt").write_text("not an image")
    bad = run_script("train.py", "--task", "image_to_image", "--dataset_path", "photos", "--cond_path", "notes",
                     "--run_name", "n", *TINY_TRAIN_FLAGS, cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--cond_path notes: no image files found")  # said "none of its 0 images has a partner"


def test_guidance_sweep_tool_draws_classes_against_scales(trained, tmp_path, monkeypatch):
    ckpt = trained / "checkpoints" / "pets_ema.pt"
    drawn = record_step_noise(monkeypatch)
    result = run_script("tools/guidance_sweep.py", "--ckpt", ckpt, "--scales", "0", "1", "3", "--per_class", "2",
                        "--show", "2", "--steps", "3", "--out", tmp_path / "cfg.png", cwd=tmp_path)
    assert "columns: scales 0, 1, 3" in result.stdout
    assert Image.open(tmp_path / "cfg.png").size == (2 + 6 * 10, 2 + 3 * 10)   # 3 classes x (3 scales x 2)
    # x_T comes from --seed 0, the per-step noise from seed + 1: the first z is not x_T again
    x_T = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert len(drawn) == 3 * 3 and drawn[0].shape == x_T.shape and abs(correlation(drawn[0], x_T)) < 0.2
    monkeypatch.undo()
    run_script("tools/guidance_sweep.py", "--ckpt", ckpt, "--mode", "classifier", "--classifier_ckpt",
               trained / "checkpoints" / "pets_classifier_ema.pt", "--scales", "0", "5", "--steps", "3",
               "--sampler", "ddim", "--out", tmp_path / "cg.png", cwd=tmp_path)
    assert Image.open(tmp_path / "cg.png").size == (2 + 2 * 10, 2 + 3 * 10)
    for flags, fragment in ((["--classes", "3"], "--classes [3]: class indices run from 0 to 2"),
                            (["--per_class", "1", "--show", "2"], "--show 2: between 1 and --per_class 1")):
        refused = run_script("tools/guidance_sweep.py", "--ckpt", ckpt, "--out", "x.png", "--steps", "3", *flags,
                             cwd=tmp_path, check=False)
        assert_one_line_error(refused, fragment)
