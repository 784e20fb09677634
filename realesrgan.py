"""
realesrgan.py: a 4x image upscaler that is not a diffusion model, for `sample.py --upscale_mode realesrgan`.

The network is RRDBNet, the generator of ESRGAN (Wang et al. 2018, arXiv 1809.00219, Sec. 3.1: the
"Residual-in-Residual Dense Block"), with the layout of the published Real-ESRGAN weights
RealESRGAN_x4plus.pth (Wang et al. 2021, arXiv 2107.10833), about 16.7 M parameters. It is written here
so that the file's state dict loads with strict key matching; nothing is downloaded. Get the file
yourself from the Real-ESRGAN releases page (github.com/xinntao/Real-ESRGAN/releases, v0.1.0) and pass
its path with --realesrgan_weights.

    x [B x 3 x H x W] in [0, 1] --conv_first--> 64 channels
      body: 23 x RRDB (each: 3 dense blocks of 5 convs, residuals scaled by 0.2), conv_body, + skip
      2 x (nearest 2x upsampling, conv, LeakyReLU)  -> 4H x 4W
      conv_hr, LeakyReLU, conv_last -> [B x 3 x 4H x 4W]
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UsageError

SCALE = 4  # the published x4plus weights


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier conv's output (dense connections,
    growing by `grow` channels), then a residual connection scaled by 0.2 (ESRGAN Sec. 3.1)."""

    def __init__(self, channels=64, grow=32):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, grow, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels + grow, grow, 3, 1, 1)
        self.conv3 = nn.Conv2d(channels + 2 * grow, grow, 3, 1, 1)
        self.conv4 = nn.Conv2d(channels + 3 * grow, grow, 3, 1, 1)
        self.conv5 = nn.Conv2d(channels + 4 * grow, channels, 3, 1, 1)

    def forward(self, x):
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(features, 1))


class RRDB(nn.Module):
    """Residual in residual: three dense blocks in a row, their sum scaled by 0.2 and added back."""

    def __init__(self, channels=64, grow=32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(channels, grow)
        self.rdb2 = ResidualDenseBlock(channels, grow)
        self.rdb3 = ResidualDenseBlock(channels, grow)

    def forward(self, x):
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """RRDBNet(x [B x 3 x H x W] in [0, 1]) -> [B x 3 x 4H x 4W]; attribute names match the .pth file."""

    def __init__(self, in_channels=3, out_channels=3, channels=64, num_blocks=23, grow=32):
        super().__init__()
        self.conv_first = nn.Conv2d(in_channels, channels, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(channels, grow) for _ in range(num_blocks)])
        self.conv_body = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv_hr = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv_last = nn.Conv2d(channels, out_channels, 3, 1, 1)

    def forward(self, x):
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def load_realesrgan(path):
    """RRDBNet with the weights in RealESRGAN_x4plus.pth (the file keeps them under 'params_ema'),
    loaded on the CPU with weights_only=True and strict key matching."""
    if not os.path.isfile(path):
        raise UsageError(f"--realesrgan_weights {path}: no such file; download RealESRGAN_x4plus.pth from "
                         "github.com/xinntao/Real-ESRGAN/releases (v0.1.0) and put it there, or pass its path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"--realesrgan_weights {path}: not a weights file ({type(error).__name__})") from None
    state = state.get("params_ema", state.get("params", state)) if isinstance(state, dict) else state
    model = RRDBNet()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UsageError(f"--realesrgan_weights {path}: not the RealESRGAN_x4plus layout "
                         f"({str(error).splitlines()[-1].strip()[:160]})") from None
    return model.eval()


@torch.no_grad()
def realesrgan_upscale(model, images_uint8, batch_size=8):
    """uint8 [N x C x H x W] (C = 1 or 3) -> uint8 [N x C x 4H x 4W]. Grayscale is copied to three
    channels for the network and averaged back afterwards."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images_uint8), batch_size):
        x = images_uint8[start:start + batch_size].float().div(255).to(device)
        grey = x.shape[1] == 1
        y = model(x.expand(-1, 3, -1, -1) if grey else x).clamp(0, 1)
        y = y.mean(1, keepdim=True) if grey else y
        out.append(y.mul(255).round().to(torch.uint8).cpu())
    return torch.cat(out)
