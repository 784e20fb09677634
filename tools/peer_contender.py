"""
Our default UNet as a contender for ../shared/bench/peers.py, which times it beside the UNets of
lucidrains/denoising-diffusion-pytorch and diffusers in one run on the same machine:

    P=/tmp/benchvenv/bin/python                      # made by ../shared/bench/setup.sh
    cd ../shared/bench && $P peers.py --contender ../../main/tools/peer_contender.py:build=ours \
        --contender ../../main/tools/peer_contender.py:build_attention_16_8=ours_attn16 \
        --only 'ours|lucid-d32|diffusers-32' --channels 3 --no-peak --md /tmp/peers.md --results-dir /tmp/peers

The bench calls build(in_ch, res) and trains model(x, t) with the plain DDPM eps loss.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from model import build_model  # noqa: E402


def build(in_ch, res):
    """The model train.py builds by default (base 32, mults 1 2 2, 2 blocks, attention at 8x8)."""
    return build_model(dict(image_size=res, in_channels=in_ch))



def build_attention_16_8(in_ch, res):
    """The same network with self-attention at 16x16 too (the default until attention cost was measured)."""
    return build_model(dict(image_size=res, in_channels=in_ch, attention_resolutions=[16, 8]))
