"""
Our UNets as contenders for ../shared/bench/peers.py, which times them beside the UNets of
lucidrains/denoising-diffusion-pytorch and diffusers in one run on the same machine. The usual way to
run it is `python tools/benchmark.py --vs-peers` (README, "Speed"), which passes these functions; by hand:

    P=/tmp/benchvenv/bin/python                      # made by ../shared/bench/setup.sh
    cd ../shared/bench && $P peers.py --contender ../../main/tools/peer_contender.py:build=ours \
        --only 'ours|lucid-d32|diffusers-32' --channels 3 --no-peak --md /tmp/peers.md --results-dir /tmp/peers

The bench calls build(in_ch, res) and trains model(x, t) with the plain DDPM eps loss. Every builder
first calls utils.keep_freed_memory(), as train.py does at start-up: it is part of how our code runs
(the bench starts each model in its own process, so the peers keep their own allocator settings).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from model import build_model  # noqa: E402
from utils import keep_freed_memory  # noqa: E402


class Bf16Autocast(torch.nn.Module):
    """model(x, t) under bf16 autocast, as train.py --amp bf16 runs it (weights and optimizer stay
    fp32; convolutions and matrix products run in bf16); the output comes back as fp32 for the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x, t).float()


class ChannelsLast(torch.nn.Module):
    """model(x, t) with weights and input in the NHWC layout, as train.py runs fp32 on a CPU by default
    (utils.resolve_channels_last); the bench hands over contiguous NCHW images."""

    def __init__(self, model):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x, t):
        return self.model(x.contiguous(memory_format=torch.channels_last), t)


def plain(in_ch, res, **settings):
    keep_freed_memory()
    return build_model(dict(image_size=res, in_channels=in_ch, **settings))


def build(in_ch, res):
    """The model train.py builds by default (base 32, mults 1 2 2, 2 blocks, attention at 8x8), fp32, in
    channels_last as train.py lays it out for fp32 on a CPU."""
    return ChannelsLast(plain(in_ch, res))


def build_bf16(in_ch, res):
    """The default model with --amp bf16 (what --amp auto picks on a CPU with AMX or AVX-512 BF16), in
    the NCHW layout that train.py keeps with bf16."""
    return Bf16Autocast(plain(in_ch, res))


def build_medium(in_ch, res):
    """The default model at twice the width, base 64 (6.95 M parameters, beside the peers' medium ones), fp32."""
    return ChannelsLast(plain(in_ch, res, base_channels=64))


def build_medium_bf16(in_ch, res):
    return Bf16Autocast(plain(in_ch, res, base_channels=64))

