"""Shared test helpers. Tests make their own tiny data; none reads a real dataset."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)

# The smallest settings that still exercise every part of train.py: 16x16 images, a two-level
# UNet with one residual block per level, T = 20.
TINY_TRAIN_FLAGS = ["--image_size", "16", "--base_channels", "16", "--channel_mults", "1", "2",
                    "--num_res_blocks", "1", "--timesteps", "20", "--batch_size", "4", "--warmup_steps", "2",
                    "--num_samples", "4", "--device", "cpu"]


def randomise_zero_inits(model):
    """The output conv and each block's last layer start at zero (so the untrained UNet outputs 0);
    give them random weights so that tests can see every input's influence."""
    torch.manual_seed(0)
    for p in model.parameters():
        if torch.all(p == 0):
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def make_image_folder(root, classes=("cat", "dog"), per_class=6, seed=0):
    """A folder of small random PNG/JPEG images of assorted sizes and modes, one subfolder per class."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(14, 30, 2)
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = Image.fromarray(array)
            if i % 3 == 1:
                image = image.convert("L")
            image.save(root / c / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def run_script(script, *args, cwd, timeout=180, check=True):
    """Run train.py / sample.py as a user would, in cwd, and return the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def assert_one_line_error(result, *fragments):
    """Bad input must end in a short 'error: ...' line naming the problem, never a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "pets")
