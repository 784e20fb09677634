"""Run by test_distributed.py under torchrun: train.py's main on each process, and each process also
writes its own weights (train.py saves only process 0's), so the test can compare them."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

real_checkpoint_states = train.checkpoint_states


def also_each_process(*args, **kwargs):
    full, ema = real_checkpoint_states(*args, **kwargs)
    torch.save(dict(model=full["model"], ema=full["ema"], step=full["step"]), f"rank{os.environ['RANK']}.pt")
    return full, ema


train.checkpoint_states = also_each_process
if __name__ == "__main__":
    train.main(sys.argv[1:])
