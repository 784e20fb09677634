"""DistributedDataParallel on two CPU processes (gloo), started by torchrun as a user would."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, TINY_TRAIN_FLAGS, make_image_folder

# Dropout 0: it is the one random stream each process draws for itself (see scaling.SharedRandomness).
FLAGS = [*TINY_TRAIN_FLAGS, "--dropout", "0", "--accumulation_iters", "2", "--max_steps", "4", "--save_every", "2",
         "--sample_every", "0", "--lr", "1e-3"]


def losses(folder):
    with open(folder / "samples" / "pets" / "loss.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_processes_hold_identical_weights_equal_to_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", per_class=10)
    (tmp_path / "two").mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "ddp_worker.py"), "--dataset_path", "../pets", *FLAGS]
    result = subprocess.run(command, cwd=tmp_path / "two", env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes" in result.stdout and result.stdout.count("run pets:") == 1  # process 0 speaks

    # Both processes hold the same weights and the same EMA, bit for bit.
    rank0, rank1 = (torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 4
    for part in ("model", "ema"):
        for key in rank0[part]:
            assert torch.equal(rank0[part][key], rank1[part][key]), (part, key)

    # One process with the global batch (2 x 4 images per micro-batch) reads the same images and draws
    # the same t and noise for each, so it trains the same weights (up to the order of float sums).
    monkeypatch.chdir(tmp_path)
    batch = FLAGS.index("--batch_size") + 1
    one_process = [*FLAGS[:batch], str(2 * int(FLAGS[batch])), *FLAGS[batch + 1:]]
    train.main(["--dataset_path", "pets", *one_process])
    single = torch.load(tmp_path / "checkpoints" / "pets.pt", weights_only=True)
    written = torch.load(tmp_path / "two" / "checkpoints" / "pets.pt", weights_only=True)
    assert written["config"]["world_size"] == 2 and written["config"]["batch_size"] == 4
    for key, value in single["model"].items():
        assert torch.allclose(value, rank0["model"][key], atol=1e-5), key
        assert torch.equal(written["model"][key], rank0["model"][key])
    # The logged loss is the mean over both processes: the single process's loss.
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path), rel=1e-5)
