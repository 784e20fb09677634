"""tools/figures.py: each teaching figure is made by a command, and shows what its caption says."""
import sys

import numpy as np
import torch
from PIL import Image

from conftest import (ROOT, TINY_TRAIN_FLAGS, assert_one_line_error, correlation, make_image_folder, record_step_noise,
                      run_script)

sys.path.insert(0, str(ROOT / "tools"))
from figures import forward_figure, schedule_curves  # noqa: E402


def test_forward_figure_starts_at_the_image_and_ends_in_noise(tmp_path):
    torch.manual_seed(1)  # not the figure's noise seed (0): rand and randn from one seed are correlated
    image = (torch.rand(3, 16, 16) * 255).to(torch.uint8)
    forward_figure(image, 1000, [0, 500, 999], tmp_path / "forward.png")
    grid = np.asarray(Image.open(tmp_path / "forward.png")).astype(float)
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)  # rows: linear, cosine; columns: the t values
    tile = lambda row, col: grid[2 + 18 * row:18 + 18 * row, 2 + 18 * col:18 + 18 * col].transpose(2, 0, 1).ravel()
    original = image.numpy().astype(float).ravel()
    for row in (0, 1):
        # t = 0: sqrt(alpha_bar) = 0.99995 and sqrt(1 - alpha_bar) = 0.01 for linear: the image, barely noised
        assert np.abs(tile(row, 0) - original).mean() < 1.5 and np.abs(tile(row, 0) - original).max() <= 6
        assert abs(np.corrcoef(tile(row, 2), original)[0, 1]) < 0.15  # t = T-1: noise, unrelated to it
    # Halfway, the cosine schedule has kept more of the image than the linear one (Improved DDPM's point).
    assert np.corrcoef(tile(1, 1), original)[0, 1] > np.corrcoef(tile(0, 1), original)[0, 1]


def test_schedule_curves_fall_and_the_linear_schedule_is_scaled_with_t():
    for timesteps in (100, 1000):
        for fraction, alpha_bar, log_snr in schedule_curves(timesteps).values():
            assert len(alpha_bar) == timesteps and fraction[-1] == 1.0
            assert torch.all(alpha_bar[1:] < alpha_bar[:-1]) and torch.all(log_snr[1:] < log_snr[:-1])
    # betas scaled by 1000/T: the same alpha_bar at the same fraction of the process, give or take
    short, long = schedule_curves(100)["linear"][1], schedule_curves(1000)["linear"][1]
    assert torch.allclose(short, long[9::10], atol=0.02)


def test_figure_commands_write_their_pngs(tmp_path, monkeypatch):
    run_script("tools/figures.py", "schedules", "--timesteps", "50", "100", "--out", tmp_path / "s.png",
               cwd=tmp_path)
    assert Image.open(tmp_path / "s.png").size == (900, 350)
    bad = run_script("tools/figures.py", "forward", "--t", "1000", cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--t 1000", "0 .. T-1 = 999")

    # raw | EMA rows from two step-numbered checkpoints of a tiny run
    make_image_folder(tmp_path / "pets")
    run_script("train.py", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "2", "--save_every", "1",
               "--keep_last", "2", "--sample_every", "0", cwd=tmp_path)
    result = run_script("tools/figures.py", "training", "--ckpts", "checkpoints/pets_step0000002.pt",
                        "checkpoints/pets_step0000001.pt", "--num_samples", "2", "--sample_steps", "3",
                        "--out", "t.png", cwd=tmp_path)
    assert "steps [1, 2]" in result.stdout  # sorted by step
    # The per-step noise does not repeat x_T: both come from seed 0 unless the steps take seed + 1.
    drawn = record_step_noise(monkeypatch)
    run_script("tools/figures.py", "training", "--ckpts", "checkpoints/pets_step0000002.pt", "--num_samples", "8",
               "--sample_steps", "3", "--out", "t1.png", cwd=tmp_path)
    x_T = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert len(drawn) == 2 * 3 and drawn[0].shape == x_T.shape and abs(correlation(drawn[0], x_T)) < 0.2
    assert Image.open(tmp_path / "t.png").size == (2 + 4 * 18, 2 + 2 * 18)  # 2 raw + 2 EMA per row, 2 rows
    bad = run_script("tools/figures.py", "training", "--ckpts", "checkpoints/pets_step0000002.pt",
                     "--sample_steps", "0", "--out", "t0.png", cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--sample_steps 0")
    # An EMA-only file, a run of another image size, an unwritable --out: one line each, before any sampling.
    bad = run_script("tools/figures.py", "training", "--ckpts", "checkpoints/pets_ema.pt", "--out", "e.png",
                     cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--ckpts checkpoints/pets_ema.pt", "full checkpoints")
    small = [*TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0", "--run_name", "small"]
    small[small.index("--image_size") + 1] = "8"
    run_script("train.py", "--dataset_path", "pets", *small, cwd=tmp_path)
    bad = run_script("tools/figures.py", "training", "--ckpts", "checkpoints/pets_step0000001.pt", "checkpoints/small.pt",
                     "--num_samples", "1", "--sample_steps", "2", "--out", "m.png", cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--ckpts checkpoints/small.pt", "8x8", "one run")
    for out, fragment in (("figure", "name a .png"), ("t.png/inside.png", "is a file")):
        bad = run_script("tools/figures.py", "training", "--ckpts", "checkpoints/pets.pt", "--out", out, cwd=tmp_path,
                         check=False)
        assert_one_line_error(bad, f"--out {out}", fragment)


def test_forward_figure_refuses_unreadable_images_and_empty_sizes(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    bad = run_script("tools/figures.py", "forward", "--image", "empty.png", "--out", "f.png", cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--image empty.png", "Pillow cannot read it")
    bad = run_script("tools/figures.py", "forward", "--image_size", "0", "--out", "f.png", cwd=tmp_path, check=False)
    assert_one_line_error(bad, "--image_size 0", "at least 1")
    assert not (tmp_path / "f.png").exists()
