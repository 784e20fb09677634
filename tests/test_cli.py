"""train.py and sample.py end to end, as a user runs them, on a tiny generated image folder."""
import csv
import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import utils
from conftest import ROOT, TINY_TRAIN_FLAGS, assert_one_line_error, make_image_folder, run_script


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_then_sample_with_only_the_checkpoint_path(tmp_path, image_folder):
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "4",
                        "--save_every", "2", "--sample_every", "2", cwd=tmp_path)
    assert "run pets: 12 images (3-channel, 16x16), 2 classes" in result.stdout
    assert "sqrt(alpha_bar_T)=" in result.stdout  # the start-up line names the terminal signal

    # The run is named after the folder; both checkpoints describe themselves in plain types.
    full = torch.load(tmp_path / "checkpoints" / "pets.pt", map_location="cpu", weights_only=True)
    ema = torch.load(tmp_path / "checkpoints" / "pets_ema.pt", map_location="cpu", weights_only=True)
    assert full["step"] == ema["step"] == 4
    assert ema["class_names"] == ["cat", "dog"] and ema["model_config"]["num_classes"] == 2
    assert ema["model_config"]["image_size"] == 16 and ema["diffusion_config"]["timesteps"] == 20
    assert set(ema) == {"kind", "ema", "task", "model_config", "diffusion_config", "class_names", "step",
                        "conditioning", "p_uncond", "t_range", "train_seconds"}
    assert isinstance(ema["train_seconds"], float) and ema["train_seconds"] > 0  # a plain float, for time axes
    assert ema["t_range"] == [0, 19]  # trained on every t (an expert denoiser's is its interval)
    assert ema["task"] == "diffusion" and ema["conditioning"] == {} and ema["p_uncond"] == 0.1
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(full)
    assert full["config"]["max_steps"] == 4 and full["config"]["channel_mults"] == [1, 2]
    assert not any(str(p).endswith(".tmp") or ".tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not torch.equal(full["model"]["output.2.weight"], ema["ema"]["output.2.weight"])  # EMA != live

    samples = tmp_path / "samples" / "pets"
    assert (samples / "step_0000002.png").is_file() and (samples / "step_0000004.png").is_file()
    assert [row["step"] for row in read_log(samples / "loss.csv")] == ["1", "2", "3", "4"]
    assert (samples / "loss.png").is_file()

    result = run_script("sample.py", "--ckpt", "checkpoints/pets_ema.pt", cwd=tmp_path)
    grid = Image.open(tmp_path / "samples" / "pets_ema.png")
    assert grid.mode == "RGB" and grid.size == (2 + 4 * 18, 2 + 2 * 18)  # one row of 4 16x16 samples per class

    # The full checkpoint samples too (with its EMA weights), and so do the optional outputs.
    run_script("sample.py", "--ckpt", "checkpoints/pets.pt", "--num_samples", "3", "--batch_size", "2",
               "--individual_dir", "each", "--gif", "reverse.gif", "--gif_frames", "5", "--out", "grid.png", cwd=tmp_path)
    files = sorted(os.listdir(tmp_path / "each"))  # 3 per class, named with their class
    assert files == ["sample_00000_cat.png", "sample_00001_cat.png", "sample_00002_cat.png",
                     "sample_00003_dog.png", "sample_00004_dog.png", "sample_00005_dog.png"]
    for name in files:
        image = Image.open(tmp_path / "each" / name)
        assert image.size == (16, 16) and image.mode == "RGB"
    gif = Image.open(tmp_path / "reverse.gif")
    assert gif.n_frames == 6  # the first step and every 4th of T = 20
    assert (tmp_path / "grid.png").is_file()
    # The same folder again: its samples would be overwritten or mixed with new ones; refused before sampling.
    again = run_script("sample.py", "--ckpt", "checkpoints/pets.pt", "--num_samples", "1", "--individual_dir", "each",
                       cwd=tmp_path, check=False)
    assert_one_line_error(again, "--individual_dir each: already holds 6 sample_*.png")
    assert sorted(os.listdir(tmp_path / "each")) == files


def test_resume_continues_at_the_saved_step_with_the_saved_settings(tmp_path, image_folder):
    run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "3",
               "--sample_every", "0", "--lr", "1e-3", cwd=tmp_path)
    first_part = torch.load(tmp_path / "checkpoints" / "pets.pt", map_location="cpu", weights_only=True)["train_seconds"]
    result = run_script("train.py", "--dataset_path", image_folder, "--resume", "--max_steps", "5",
                        "--sample_every", "0", cwd=tmp_path)
    assert "resuming at step 3" in result.stdout
    full = torch.load(tmp_path / "checkpoints" / "pets.pt", map_location="cpu", weights_only=True)
    assert full["step"] == 5
    assert full["config"]["lr"] == 1e-3 and full["config"]["image_size"] == 16  # not the defaults
    assert full["optimizer"]["state"][0]["step"].item() == 5  # the optimizer continued too
    assert [row["step"] for row in read_log(tmp_path / "samples" / "pets" / "loss.csv")] == ["1", "2", "3", "4", "5"]
    # The training time adds up over the resumed parts, and the EMA file records it too.
    ema = torch.load(tmp_path / "checkpoints" / "pets_ema.pt", map_location="cpu", weights_only=True)
    assert ema["train_seconds"] == full["train_seconds"] > first_part > 0

    # Nothing is replaced by accident: the same command without --resume is refused, and leaves the run as
    # it was; --overwrite starts afresh on purpose.
    fresh = ["--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0"]
    assert_one_line_error(run_script("train.py", *fresh, cwd=tmp_path, check=False),
                          "checkpoints/pets.pt already holds a run named 'pets'", "--resume", "--overwrite")
    assert torch.load(tmp_path / "checkpoints" / "pets.pt", weights_only=True)["step"] == 5
    assert len(read_log(tmp_path / "samples" / "pets" / "loss.csv")) == 5
    checkpoints = tmp_path / "checkpoints"
    for name in ("pets_step0009999.pt", "pets_sr.pt"):  # an old --keep_last file of this run; another run
        (checkpoints / name).write_bytes((checkpoints / "pets.pt").read_bytes())
    overwritten = run_script("train.py", *fresh, "--overwrite", cwd=tmp_path)
    assert "--overwrite: removed the earlier run's 3 checkpoint files" in overwritten.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["pets.pt", "pets_ema.pt", "pets_sr.pt"]
    assert torch.load(tmp_path / "checkpoints" / "pets.pt", weights_only=True)["step"] == 1
    assert [row["step"] for row in read_log(tmp_path / "samples" / "pets" / "loss.csv")] == ["1"]


def test_max_minutes_stops_the_run_and_saves_it(tmp_path, image_folder):
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "100000",
                        "--max_minutes", "0.0001", "--warmup_steps", "1", "--sample_every", "0", "--amp", cwd=tmp_path)
    assert "--max_minutes 0.0001 reached" in result.stdout
    # --amp alone on a CPU: bf16 only where the CPU has bf16 matrix hardware (utils.cpu_has_fast_bf16)
    assert ("--amp auto: bf16" if utils.cpu_has_fast_bf16() else "--amp auto: fp32") in result.stdout
    full = torch.load(tmp_path / "checkpoints" / "pets.pt", map_location="cpu", weights_only=True)
    assert 1 <= full["step"] < 100 and full["train_seconds"] >= 0.006
    assert full["scheduler"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)  # the cosine ran to its end with the clock
    result = run_script("train.py", "--dataset_path", image_folder, "--max_minutes", "0", cwd=tmp_path, check=False)
    assert_one_line_error(result, "--max_minutes 0")


def test_bf16_asked_by_name_on_a_cpu_without_bf16_hardware_runs_with_a_note(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: False)  # as on an AVX2-only CPU (in-process runs)
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "1",
                        "--sample_every", "0", "--num_samples", "1", "--amp", "bf16", cwd=tmp_path)
    assert "note: --amp bf16 on a CPU without bf16 matrix hardware" in result.stdout
    result = run_script("sample.py", "--ckpt", tmp_path / "checkpoints" / "pets_ema.pt", "--num_samples", "1",
                        "--sampler", "ddim", "--steps", "2", "--amp", "bf16", cwd=tmp_path)
    assert "--amp bf16: the network in bf16 autocast" in result.stdout and "note: --amp bf16" in result.stdout
    result = run_script("sample.py", "--ckpt", tmp_path / "checkpoints" / "pets_ema.pt", "--num_samples", "1",
                        "--sampler", "ddim", "--steps", "2", "--amp", "auto", cwd=tmp_path)
    assert "--amp auto: fp32" in result.stdout and "note:" not in result.stdout


def test_unconditional_grayscale_folder(tmp_path):
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (20, 20), color=i * 80).save(folder / f"{i}.png")
    result = run_script("train.py", "--dataset_path", folder, *TINY_TRAIN_FLAGS, "--max_steps", "2",
                        "--sample_every", "0", cwd=tmp_path)
    assert "3 images (1-channel, 16x16)" in result.stdout and "no classes" in result.stdout
    assert "batch_size lowered" in result.stdout
    run_script("sample.py", "--ckpt", "checkpoints/digits_ema.pt", "--individual_dir", "out", "--num_samples", "2",
               cwd=tmp_path)
    assert Image.open(tmp_path / "out" / "sample_00000.png").mode == "L"


def test_builtin_shapes_dataset_is_the_default(tmp_path):
    result = run_script("train.py", *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0", cwd=tmp_path)
    assert "run shapes: 10000 images (3-channel, 16x16)" in result.stdout
    assert (tmp_path / "checkpoints" / "shapes_ema.pt").is_file()


def start_training(tmp_path, folder, *extra, own_group=False):
    """own_group: in a process group of its own, so that a test can signal the run and its data-loading
    workers together, as Ctrl-C in a terminal and a scheduler's SIGTERM (SLURM, systemd) do."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--dataset_path", str(folder),
                             *TINY_TRAIN_FLAGS, "--max_steps", "100000", "--sample_every", "0", *extra],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=own_group)


def wait_for_steps(tmp_path, process, timeout=60):
    """Wait until the run has taken at least 3 steps (its progress bar goes to stderr). The read waits at
    most until the deadline (select), so a run that hangs silently fails the test instead of the suite."""
    deadline = time.time() + timeout
    seen = ""
    while time.time() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], max(0.0, deadline - time.time()))
        if not ready:
            break
        chunk = os.read(process.stderr.fileno(), 65536).decode(errors="ignore")
        seen += chunk
        if any(int(n) >= 3 for n in re.findall(r" (\d+)/100000", seen)):
            return
        if not chunk and process.poll() is not None:
            break
    raise AssertionError("training did not take 3 steps: " + seen[-2000:])


def test_ctrl_c_and_sigterm_save_a_checkpoint_before_exiting(tmp_path, image_folder):
    for sig in (signal.SIGINT, signal.SIGTERM):
        process = start_training(tmp_path, image_folder, "--save_every", "100000")
        wait_for_steps(tmp_path, process)
        process.send_signal(sig)
        stdout, _ = process.communicate(timeout=60)
        assert process.returncode == 130
        assert "interrupted at step" in stdout
        state = torch.load(tmp_path / "checkpoints" / "pets.pt", map_location="cpu", weights_only=True)
        assert state["step"] >= 3
        assert (tmp_path / "checkpoints" / "pets_ema.pt").is_file()
        for name in ("pets.pt", "pets_ema.pt"):  # the next signal's run starts afresh
            os.remove(tmp_path / "checkpoints" / name)


def test_a_signal_to_the_whole_process_group_with_loading_workers_still_saves(tmp_path, image_folder):
    """Ctrl-C and a scheduler's SIGTERM reach the data-loading workers too (--num_workers; 4 on CUDA).
    The main process alone acts (one "stopping" line), finishes the step from its workers' batches, saves,
    and stops the workers; before, SIGTERM killed them and the run died with a RuntimeError, unsaved."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        process = start_training(tmp_path, image_folder, "--save_every", "100000", "--num_workers", "2",
                                 own_group=True)
        wait_for_steps(tmp_path, process)
        os.killpg(process.pid, sig)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 130 and "interrupted at step" in stdout, stderr[-2000:]
        assert stderr.count("stopping after this step") == 1 and "Traceback" not in stderr, stderr[-2000:]
        assert torch.load(tmp_path / "checkpoints" / "pets.pt", weights_only=True)["step"] >= 3
        with pytest.raises(ProcessLookupError):  # nothing of the run is left: its workers stopped too
            os.killpg(process.pid, 0)
        for name in ("pets.pt", "pets_ema.pt"):
            os.remove(tmp_path / "checkpoints" / name)


def test_ctrl_c_while_sampling_is_one_line_not_a_traceback(tmp_path, image_folder):
    """sample.py has nothing to save half-way: Ctrl-C stops it with one line and exit code 130."""
    run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every",
               "0", cwd=tmp_path)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    process = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--ckpt", "checkpoints/pets_ema.pt",
                                "--num_samples", "100000", "--batch_size", "4", "--device", "cpu"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, seen = time.time() + 60, ""
    while time.time() < deadline and "sampling" not in seen:  # the sampler's progress bar: it is sampling
        ready, _, _ = select.select([process.stderr], [], [], max(0.0, deadline - time.time()))
        chunk = os.read(process.stderr.fileno(), 65536).decode(errors="ignore") if ready else ""
        if not chunk and process.poll() is not None:
            break
        seen += chunk
    try:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:  # never leave it sampling on the shared cores
        process.kill()
    assert process.returncode == 130, (seen + stderr)[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted")


# --- bad input: one clear line, never a traceback --------------------------------------------
# --- bad input: one clear line, never a traceback --------------------------------------------

def test_missing_dataset_folder(tmp_path):
    assert_one_line_error(run_script("train.py", "--dataset_path", "nowhere", cwd=tmp_path, check=False),
                          "--dataset_path nowhere", "no such folder")


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert_one_line_error(run_script("train.py", "--dataset_path", "empty", cwd=tmp_path, check=False),
                          "no image files found")


def test_folder_with_no_readable_image(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"this is not a png")
    result = run_script("train.py", "--dataset_path", "broken", cwd=tmp_path, check=False)
    assert_one_line_error(result, "none of the 1 image files could be read", "tools/clean_dataset.py")


def test_image_size_the_unet_cannot_halve(tmp_path, image_folder):
    result = run_script("train.py", "--dataset_path", image_folder, "--image_size", "30", cwd=tmp_path, check=False)
    assert_one_line_error(result, "--image_size 30", "divisible by 4")


def test_outputs_inside_the_image_folder_are_refused(tmp_path, image_folder):
    """Run from inside the data with the defaults, checkpoints/ and samples/ would be read back as classes
    (samples/loss.png as an image) the next time the folder is read; and "." names the run after the folder."""
    result = run_script("train.py", "--dataset_path", ".", *TINY_TRAIN_FLAGS, cwd=image_folder, check=False)
    assert_one_line_error(result, "--checkpoint_dir checkpoints: inside --dataset_path .")
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--sample_dir",
                        image_folder / "grids", cwd=tmp_path, check=False)
    assert_one_line_error(result, "--sample_dir", "inside --dataset_path")
    assert sorted(os.listdir(image_folder)) == ["cat", "dog"]
    run_script("train.py", "--dataset_path", ".", *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0",
               "--checkpoint_dir", tmp_path / "ck", "--sample_dir", tmp_path / "sm", cwd=image_folder)
    assert sorted(os.listdir(tmp_path / "ck")) == ["pets.pt", "pets_ema.pt"]  # named after the folder "." is


def test_resume_reads_a_moved_data_folder_given_by_flag(tmp_path, image_folder):
    """The data folder moved (or the run is resumed from elsewhere): a typed --dataset_path is read instead
    of the saved one, with a note; the class check still holds."""
    run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every",
               "0", cwd=tmp_path)
    image_folder.rename(tmp_path / "moved")
    result = run_script("train.py", "--dataset_path", "moved", "--run_name", "pets", "--resume", "--max_steps", "2",
                        "--sample_every", "0", cwd=tmp_path)
    assert "note: reading the data from --dataset_path moved (the run read" in result.stdout
    state = torch.load(tmp_path / "checkpoints" / "pets.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["dataset_path"] == "moved"


def test_out_of_memory_is_one_line_naming_the_flags_that_help(tmp_path, image_folder, monkeypatch):
    """A GPU (or the CPU) running out of memory is the commonest failure of a first run; its fix is a flag."""
    from ddpm import GaussianDiffusion
    run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every",
               "0", cwd=tmp_path)

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(GaussianDiffusion, "training_loss", no_memory)
    monkeypatch.setattr(GaussianDiffusion, "p_sample", no_memory)
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--run_name", "big",
                        cwd=tmp_path, check=False)
    assert_one_line_error(result, "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)", "--batch_size",
                          "--grad_checkpointing")
    result = run_script("sample.py", "--ckpt", "checkpoints/pets_ema.pt", cwd=tmp_path, check=False)
    assert_one_line_error(result, "out of memory", "lower --batch_size")
    monkeypatch.setattr(GaussianDiffusion, "p_sample", lambda *a, **k: 1 / 0)  # any other error keeps its traceback
    assert "ZeroDivisionError" in run_script("sample.py", "--ckpt", "checkpoints/pets_ema.pt", cwd=tmp_path,
                                             check=False).stderr


def test_resume_without_a_checkpoint(tmp_path, image_folder):
    result = run_script("train.py", "--dataset_path", image_folder, "--resume", cwd=tmp_path, check=False)
    assert_one_line_error(result, "--resume", "checkpoints/pets.pt")


def test_bad_checkpoints(tmp_path, image_folder):
    assert_one_line_error(run_script("sample.py", "--ckpt", "missing.pt", cwd=tmp_path, check=False),
                          "--ckpt missing.pt", "no such file")
    (tmp_path / "runs").mkdir()
    assert_one_line_error(run_script("sample.py", "--ckpt", "runs", cwd=tmp_path, check=False),
                          "--ckpt runs", "a folder, not a checkpoint file")
    assert_one_line_error(run_script("train.py", "--dataset_path", image_folder / "cat" / "0.png", cwd=tmp_path,
                                     check=False), "a file, not a folder")
    (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
    assert_one_line_error(run_script("sample.py", "--ckpt", "junk.pt", cwd=tmp_path, check=False),
                          "not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert_one_line_error(run_script("sample.py", "--ckpt", "other.pt", cwd=tmp_path, check=False),
                          "lacks model_config")
    # A checkpoint whose weights do not match its own config (a key removed): strict loading refuses.
    run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "1",
               "--sample_every", "0", cwd=tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "pets_ema.pt", weights_only=True)
    del state["ema"]["output.2.bias"]
    torch.save(state, tmp_path / "edited.pt")
    assert_one_line_error(run_script("sample.py", "--ckpt", "edited.pt", cwd=tmp_path, check=False),
                          "do not match", "output.2.bias")
    # Settings edited by hand, or from a newer version: one line too.
    state = torch.load(tmp_path / "checkpoints" / "pets_ema.pt", weights_only=True)
    torch.save(dict(state, model_config="unet"), tmp_path / "string_config.pt")
    assert_one_line_error(run_script("sample.py", "--ckpt", "string_config.pt", cwd=tmp_path, check=False),
                          "its model_config is a str, not a dict")
    torch.save(dict(state, model_config=dict(state["model_config"], bogus=1)), tmp_path / "newer.pt")
    assert_one_line_error(run_script("sample.py", "--ckpt", "newer.pt", cwd=tmp_path, check=False),
                          "unknown model settings: ['bogus']")
    torch.save(dict(state, diffusion_config=dict(state["diffusion_config"], bogus=1)), tmp_path / "newer2.pt")
    for script, flags in (("sample.py", ["--ckpt"]), ("tools/nll.py", ["--dataset_path", image_folder, "--ckpt"])):
        assert_one_line_error(run_script(script, *flags, "newer2.pt", cwd=tmp_path, check=False),
                              "unknown diffusion settings: ['bogus']")


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, image_folder):
    """An absurd learning rate makes the loss infinite within a few steps: training stops naming the
    step and the t values, and the checkpoint on disk is the last one written with finite weights."""
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "200",
                        "--lr", "1e30", "--grad_clip", "1e30", "--warmup_steps", "1", "--save_every", "1",
                        "--sample_every", "0", cwd=tmp_path, check=False)
    assert_one_line_error(result, "not finite", "t of the non-finite images here: [", "5 steps in a row",
                          "nothing saved since checkpoints/pets.pt")
    assert result.stdout.count("step skipped, weights unchanged") == 4  # warned, then stopped at the 5th
    state = torch.load(tmp_path / "checkpoints" / "pets.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_after_the_dataset_changed_names_what_changed(tmp_path, image_folder):
    run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--max_steps", "1",
               "--sample_every", "0", cwd=tmp_path)
    make_image_folder(image_folder, classes=("bird",), per_class=2)  # a third class appears
    result = run_script("train.py", "--dataset_path", image_folder, "--resume", "--max_steps", "2",
                        cwd=tmp_path, check=False)
    assert_one_line_error(result, "classes differ", "3 classes now, 2 saved")


def test_train_reads_an_mnist_style_npz_file(tmp_path):
    """x_train [N x 28 x 28] uint8 and y_train: padded to 32x32, one class per label value, no flips for
    anything named like MNIST; the run is named after the file."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny_mnist.npz", x_train=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
             y_train=np.array([7, 5] * 5))
    result = run_script("train.py", "--dataset_path", "tiny_mnist.npz", *TINY_TRAIN_FLAGS, "--image_size", "32",
                        "--max_steps", "1", "--sample_every", "0", cwd=tmp_path)
    assert "run tiny_mnist: 10 images (1-channel, 32x32), 2 classes, no flips" in result.stdout
    ema = torch.load(tmp_path / "checkpoints" / "tiny_mnist_ema.pt", weights_only=True)
    assert ema["class_names"] == ["5", "7"] and ema["model_config"]["in_channels"] == 1
    assert torch.load(tmp_path / "checkpoints" / "tiny_mnist.pt", weights_only=True)["config"]["hflip"] == "off"  # saved as decided
    # Resumed by its name alone, the run still knows its data is digits: no flips, as before.
    resumed = run_script("train.py", "--run_name", "tiny_mnist", "--resume", "--max_steps", "2", cwd=tmp_path)
    assert "run tiny_mnist: 10 images (1-channel, 32x32), 2 classes, no flips" in resumed.stdout
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8), dtype=np.uint8))
    assert_one_line_error(run_script("train.py", "--dataset_path", "bad.npz", cwd=tmp_path, check=False),
                          "--dataset_path bad.npz", "x_train and y_train")


def test_an_in_process_run_past_its_timeout_fails_instead_of_stalling_the_suite(tmp_path):
    """The suite's own safety net (conftest.run_script): scripts run inside the test process, where
    subprocess.run's timeout cannot reach; a SIGALRM timer stands in for it, and a script's
    `except Exception` cannot swallow it. Afterwards nothing of it is left armed."""
    if not hasattr(signal, "setitimer"):
        pytest.skip("no SIGALRM on this platform: in-process runs have no timeout here")
    script = tmp_path / "stuck.py"
    # 5 s of 10 ms naps, each guarded: with no timer, it ends by itself and the test fails below.
    script.write_text("import time\nprint('started')\nfor _ in range(500):\n    try:\n        time.sleep(0.01)\n"
                      "    except Exception:\n        pass\n")
    started = time.perf_counter()
    with pytest.raises(AssertionError, match=r"stuck.py was still running after its 0.5 s timeout:\nstarted"):
        run_script(script, cwd=tmp_path, timeout=0.5, check=False)
    assert time.perf_counter() - started < 4
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
    assert os.getcwd() != str(tmp_path) and str(tmp_path) not in sys.path
