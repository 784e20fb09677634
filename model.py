"""
model.py: the networks. UNet(x_t, t, y) -> a tensor shaped like x_t (the predicted noise), and
NoisyClassifier(x_t, t) -> class logits, the encoder half of the same UNet (for classifier guidance).

It knows nothing about diffusion: it maps an image, an integer timestep and an optional class
label to an image. ddpm.py decides what the output means. The architecture follows the DDPM
paper's (Ho et al. 2020, Sec. 4: a PixelCNN++-style UNet with group normalisation, a
Transformer sinusoidal timestep embedding and self-attention at low resolutions), as refined in
Improved DDPM and ADM (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).

    x_t [B x C x S x S] --conv--> base channels
      down:  per level, num_res_blocks x ResBlock (+ attention at chosen resolutions), then halve S
      middle: ResBlock, attention, ResBlock at the lowest resolution
      up:    per level, (num_res_blocks + 1) x ResBlock on [h, skip] (+ attention), then double S
    --GroupNorm, SiLU, zero-initialised conv--> prediction [B x C_out x S x S]

Image-conditioned models (super-resolution, image-to-image; cascade.py) give the UNet a conditioning
image of the same size that is concatenated to x_t as extra input channels (cond_channels), and, for
the cascade's noise-conditioning augmentation, the augmentation level cond_t, embedded like t.

A checkpoint stores the plain dict that build_model takes, so sample.py rebuilds the exact network.
Gradient checkpointing (run_block) is a runtime switch outside that dict: model.grad_checkpointing.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils import UsageError

# The default network: 1.7 M parameters at base_channels 32, quick on a laptop CPU.
DEFAULT_MODEL_CONFIG = dict(
    image_size=32,            # S: the square size the model is built for (checked against it)
    in_channels=3,            # C: 3 for RGB, 1 for grayscale
    out_channels=None,        # None = in_channels (one noise value per input value)
    base_channels=32,         # channels at the highest resolution
    channel_mults=(1, 2, 2),  # channels per level = base_channels * mult; one level per entry
    num_res_blocks=2,         # residual blocks per level on the way down
    attention_resolutions=None,  # feature-map sizes with self-attention; None = default_attention_resolutions
    dropout=0.1,              # inside residual blocks (DDPM used 0.1 on CIFAR-10)
    num_classes=0,            # 0 = unconditional; else labels 0..num_classes-1, and num_classes = "no label"
    head_channels=32,         # channels per attention head
    cond_channels=0,          # channels of a conditioning image concatenated to x_t (0 = none; cascade.py)
    cond_augment=False,       # also embed the conditioning image's noise-augmentation level cond_t
)


def level_resolutions(image_size, channel_mults):
    """The feature-map size at each UNet level: S, S/2, S/4, ... (one per --channel_mults entry)."""
    return [image_size // 2 ** level for level in range(len(channel_mults))]


def default_attention_resolutions(image_size, channel_mults):
    """Attention where the feature map is 8x8 or smaller. If no level is that small, at the lowest level
    as long as it is 16x16 or smaller (DDPM's largest attention map: 16x16 on 32x32 CIFAR-10); above
    that, only the middle block attends (it always does), because attention is quadratic in the number
    of pixels: a one-level model at 32x32 trained 4.7x slower with attention in its five level blocks
    (1024 tokens each; 1.9 s against 0.4 s a step at batch 32 on a 2-core Zen 4). On a 2-CPU machine,
    attention at 16x16 as well as 8x8 cost the default model about a quarter of its training speed
    (tools/peer_contender.py; README, Speed). Pass --attention_resolutions 16 8 to get it back."""
    resolutions = level_resolutions(image_size, channel_mults)
    return [r for r in resolutions if r <= 8] or [r for r in resolutions[-1:] if r <= 16]


def check_network_settings(image_size, channel_mults, attention_resolutions=None):
    """One-line errors for network flags that would otherwise fail deep in torch (a multiplier of 0
    builds a convolution with 0 channels) or silently do nothing (an attention size no level has)."""
    check_image_size(image_size, channel_mults)
    if any(mult < 1 for mult in channel_mults):
        raise UsageError(f"--channel_mults {' '.join(map(str, channel_mults))}: each multiplier must be at least 1")
    resolutions = level_resolutions(image_size, channel_mults)
    unused = [r for r in attention_resolutions or [] if r not in resolutions]
    if unused:
        raise UsageError(f"--attention_resolutions {unused[0]}: no UNet level has that size; with --image_size "
                         f"{image_size} and --channel_mults {' '.join(map(str, channel_mults))} the levels are "
                         f"{' '.join(map(str, resolutions))}")


def group_count(channels):
    """GroupNorm groups: up to 32 as in DDPM, but at least 4 channels per group. With one channel
    per group the norm would be per-channel and erase any per-channel signal added before it. The
    count must divide channels (GroupNorm's rule): the outer gcd sees to it for counts that are not a
    multiple of 4 (--base_channels 50: 2 groups), and changes nothing for those that are."""
    return math.gcd(math.gcd(32, max(1, channels // 4)), channels)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of integer timesteps, as in the Transformer (DDPM Sec. 4).
    t: int64 [B] -> float [B x dim]; half the dimensions are sines, half cosines, at the frequencies
    max_period^(-k / half), k = 0 .. half-1: from 1 down to just above 1/max_period, so nearby t get
    nearby (but distinct) vectors. An odd dim (an odd --base_channels) gets a last column of zeros."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]                  # [B x half]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # [B x 2 half]
    return F.pad(embedding, (0, dim % 2))                                 # [B x dim]


class Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014, "inverted": kept values are scaled by 1 / (1 - p), so the expected
    activation is unchanged and evaluation is the identity), the distribution of nn.Dropout with p rounded
    to a multiple of 2^-15 (0.1 -> 3277 / 32768 = 0.100006). Only the way the mask is drawn differs, because
    torch's Bernoulli kernel and even its uniform floats were slow on the CPUs we measured (README, Speed:
    "What each lever is worth"). x: [B x C x H x W] -> same shape, dtype and memory layout."""

    def __init__(self, p):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise UsageError(f"--dropout {p}: must be at least 0 and below 1")
        self.p = p
        # Drop when a uniform integer in [0, 2^15) is below threshold: P(drop) = threshold / 2^15.
        self.threshold = min(round(p * 2**15), 2**15 - 1)
        self.scale = 2**15 / (2**15 - self.threshold)                  # 1 / (1 - P(drop)), exactly

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            keep = random_15_bit_integers_like(x) >= self.threshold       # P(keep) = 1 - threshold / 2^15
        else:  # GPUs and torch.compile draw floats in parallel and fast; threshold / 2^15 is exact in float32
            keep = torch.rand_like(x, dtype=torch.float32) >= self.threshold / 2**15
        return x * (keep * self.scale).to(x.dtype)      # backward: the same mask times the scale

    def extra_repr(self):
        return f"p={self.p}"


def random_15_bit_integers_like(x):
    """Independent integers uniform on [0, 2^15), one per element of x, in x's shape and memory layout
    (channels_last included), drawn on the CPU. Why not torch.rand_like: torch's CPU generator is one
    serial Mersenne Twister, and one float per element made dropout's masks 7% of a training step on
    2 cores. One int64 from random_() is uniform on [0, 2^63): its four 16-bit quarters, each with its
    top bit cleared (the last quarter's is always 0), are four independent 15-bit integers, for a
    quarter of the draws (dropout on 2 M elements then takes about 10 ms instead of 20 ms here)."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()   # [ceil(n / 4)], uniform on [0, 2^63)
    quarters = words.view(torch.int16)[:n] & 0x7FFF                  # [n], uniform on [0, 2^15)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = x.shape
        return quarters.view(b, h, w, c).permute(0, 3, 1, 2)         # [B x C x H x W], stored as NHWC
    return quarters.view(x.shape)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then GroupNorm modulated by the (time, class) embedding ->
    SiLU -> dropout -> conv, plus a skip connection (1x1 conv when the channel count changes).

    The embedding scales and shifts the normalised features, norm(h) * (1 + scale) + shift: the
    "adaptive group normalization" of Dhariwal & Nichol 2021 (their architecture section). DDPM
    adds the embedding before the norm instead, which then subtracts part of it again (all of it
    with one channel per group)."""

    def __init__(self, in_channels, out_channels, embedding_dim, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)  # per-channel scale and shift
        self.norm2 = nn.GroupNorm(group_count(out_channels), out_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: a stable deep start
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, embedding):
        # x: [B x C_in x H x W], embedding: [B x E] (already passed through SiLU)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embedding(embedding)[:, :, None, None].chunk(2, dim=1)  # each [B x C_out x 1 x 1]
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h                               # [B x C_out x H x W]


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions of a feature map, with a residual connection.
    The attention itself is torch's scaled_dot_product_attention (fused kernels where available)."""

    def __init__(self, channels, head_channels):
        super().__init__()
        # about head_channels channels per head, and a head count that divides channels (112 channels with
        # 32 per head: 3 would not; 2 heads of 56 do)
        self.heads = max(h for h in range(1, max(1, channels // head_channels) + 1) if channels % h == 0)
        self.norm = nn.GroupNorm(group_count(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity, like the residual blocks
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)            # each [B x heads x HW x C/heads]
        out = F.scaled_dot_product_attention(q, k, v)         # softmax(q k^T / sqrt(d)) v
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


def check_image_size(image_size, channel_mults):
    levels = len(channel_mults)
    if image_size % 2 ** (levels - 1) != 0:
        raise UsageError(f"--image_size {image_size}: the UNet halves it {levels - 1} times "
                         f"(--channel_mults has {levels} levels), so it must be divisible by {2 ** (levels - 1)}; "
                         f"try {max(2 ** (levels - 1), image_size // 2 ** (levels - 1) * 2 ** (levels - 1))}")


def time_mlp(base_channels, embedding_dim):
    """Timestep t -> sinusoid (timestep_embedding) -> this MLP (DDPM Sec. 4)."""
    return nn.Sequential(nn.Linear(base_channels, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))


def down_path(image_size, base_channels, channel_mults, num_res_blocks, attention_resolutions, dropout,
              head_channels, embedding_dim):
    """The UNet's encoder: per level, num_res_blocks ResBlocks (+ attention), then a strided conv that
    halves the resolution. Returns (blocks, skip_channels: the channels each block hands to the up path,
    the channels and resolution at the bottom). Shared by UNet and NoisyClassifier."""
    blocks = nn.ModuleList()
    channels, skip_channels, resolution = base_channels, [base_channels], image_size
    for level, mult in enumerate(channel_mults):
        for _ in range(num_res_blocks):
            block = nn.ModuleList([ResBlock(channels, base_channels * mult, embedding_dim, dropout)])
            channels = base_channels * mult
            if resolution in attention_resolutions:
                block.append(AttentionBlock(channels, head_channels))
            blocks.append(block)
            skip_channels.append(channels)
        if level < len(channel_mults) - 1:  # halve the resolution with a strided convolution
            blocks.append(nn.ModuleList([nn.Conv2d(channels, channels, 3, stride=2, padding=1)]))
            skip_channels.append(channels)
            resolution //= 2
    return blocks, skip_channels, channels, resolution


def run_block(block, h, embedding, checkpointed=False):
    """One unit of the down path, middle or up path: its layers in order, the ResBlocks also taking the
    embedding. checkpointed: gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear
    Memory Cost"). Only the unit's input is kept; its activations are recomputed in the backward pass,
    so stored activations grow with the number of units, not of layers, for about one more forward pass.
    torch's checkpoint restores the RNG state for the recomputation, so dropout draws the same masks."""
    # A lone downsampling conv stores only its input, which checkpoint would keep anyway.
    if checkpointed and isinstance(block[0], ResBlock):
        return checkpoint(run_block, block, h, embedding, use_reentrant=False)
    for layer in block:
        h = layer(h, embedding) if isinstance(layer, ResBlock) else layer(h)
    return h


class UNet(nn.Module):
    """UNet(x_t [B x C x S x S], t int64 [B], y int64 [B] or None, cond [B x C_cond x S x S] or None,
    cond_t int64 [B] or None) -> [B x C_out x S x S]."""

    def __init__(self, image_size, in_channels, out_channels, base_channels, channel_mults, num_res_blocks,
                 attention_resolutions, dropout, num_classes, head_channels, cond_channels, cond_augment):
        super().__init__()
        check_network_settings(image_size, channel_mults)
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.cond_channels = cond_channels
        # Gradient checkpointing (run_block); train.py sets model.grad_checkpointing = True. A runtime
        # switch, not a setting of the network: it changes no weight, so it stays out of the config.
        self.grad_checkpointing = False
        embedding_dim = 4 * base_channels

        # Timestep t -> sinusoid -> MLP (DDPM Sec. 4); a class label adds a learned vector.
        self.time_mlp = time_mlp(base_channels, embedding_dim)
        # num_classes + 1 rows: the last row is "no label", used for unconditional samples and trained
        # by classifier-free guidance's label dropout (guidance.py).
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim) if num_classes > 0 else None
        # The conditioning image's augmentation level (cascade.py), embedded like t by its own MLP.
        self.cond_t_mlp = time_mlp(base_channels, embedding_dim) if cond_augment else None

        self.input_conv = nn.Conv2d(in_channels + cond_channels, base_channels, 3, padding=1)

        # Down path. skip_channels records what each block hands to the up path.
        self.down, skip_channels, channels, resolution = down_path(
            image_size, base_channels, channel_mults, num_res_blocks, attention_resolutions, dropout,
            head_channels, embedding_dim)

        self.middle = nn.ModuleList([ResBlock(channels, channels, embedding_dim, dropout),
                                     AttentionBlock(channels, head_channels),
                                     ResBlock(channels, channels, embedding_dim, dropout)])

        # Up path: one more block per level than on the way down, each eating one skip tensor.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(channels + skip_channels.pop(), base_channels * mult,
                                                embedding_dim, dropout)])
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    block.append(AttentionBlock(channels, head_channels))
                if level > 0 and i == num_res_blocks:  # double the resolution: nearest, then a conv
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(channels, channels, 3, padding=1))
                    resolution *= 2
                self.up.append(block)

        self.output = nn.Sequential(nn.GroupNorm(group_count(channels), channels), nn.SiLU(),
                                    nn.Conv2d(channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.output[-1].weight)  # the first prediction is 0: a calm start for the loss
        nn.init.zeros_(self.output[-1].bias)

    def forward(self, x, t, y=None, cond=None, cond_t=None):
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet built for [B x {self.in_channels} x {self.image_size} x {self.image_size}], "
                             f"got {list(x.shape)}")
        embedding = self.time_mlp(timestep_embedding(t, self.input_conv.out_channels))  # [B x E]
        if self.class_embedding is not None:
            if y is None:  # no label given: the reserved "no label" row
                y = torch.full_like(t, self.num_classes)
            embedding = embedding + self.class_embedding(y)
        if self.cond_t_mlp is not None:  # no level given: 0, an (almost) clean conditioning image
            cond_t = torch.zeros_like(t) if cond_t is None else cond_t
            embedding = embedding + self.cond_t_mlp(timestep_embedding(cond_t, self.input_conv.out_channels))
        embedding = F.silu(embedding)  # every ResBlock applies its Linear to SiLU(embedding)

        if self.cond_channels:
            if cond is None or cond.shape[1] != self.cond_channels or cond.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"this UNet is image-conditioned: it needs cond [B x {self.cond_channels} x "
                                 f"{self.image_size} x {self.image_size}], got {None if cond is None else list(cond.shape)}")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)  # [B x (C + C_cond) x S x S]
        # Only when gradients are being recorded: sampling (no_grad) has no backward pass to save for.
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = run_block(block, h, embedding, checkpointed)
            skips.append(h)
        h = run_block(self.middle, h, embedding, checkpointed)
        for block in self.up:
            h = torch.cat([h, skips.pop()], dim=1)  # [B x (C + C_skip) x H x W]
            h = run_block(block, h, embedding, checkpointed)
        return self.output(h)


class NoisyClassifier(nn.Module):
    """p_phi(y | x_t): a classifier of *noisy* images, for classifier guidance (Dhariwal & Nichol 2021,
    Sec. 4; guidance.py). As in their paper it is the UNet's encoder half, conditioned on t the same way,
    then the middle block and a pooled linear head (they pool with attention; a mean is enough here).
    NoisyClassifier(x_t [B x C x S x S], t int64 [B]) -> logits [B x num_classes]."""

    def __init__(self, image_size, in_channels, base_channels, channel_mults, num_res_blocks,
                 attention_resolutions, dropout, num_classes, head_channels):
        super().__init__()
        check_network_settings(image_size, channel_mults)
        self.image_size, self.in_channels = image_size, in_channels
        self.grad_checkpointing = False  # as in UNet: a runtime switch, not part of the config
        embedding_dim = 4 * base_channels
        self.time_mlp = time_mlp(base_channels, embedding_dim)
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, _, channels, _ = down_path(image_size, base_channels, channel_mults, num_res_blocks,
                                              attention_resolutions, dropout, head_channels, embedding_dim)
        self.middle = nn.ModuleList([ResBlock(channels, channels, embedding_dim, dropout),
                                     AttentionBlock(channels, head_channels)])
        self.head = nn.Sequential(nn.GroupNorm(group_count(channels), channels), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x, t):
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size or x.shape[1] != self.in_channels:
            raise ValueError(f"classifier built for [B x {self.in_channels} x {self.image_size} x "
                             f"{self.image_size}], got {list(x.shape)}")
        embedding = F.silu(self.time_mlp(timestep_embedding(t, self.input_conv.out_channels)))  # [B x E]
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()  # as in UNet.forward
        h = self.input_conv(x)
        for block in self.down:
            h = run_block(block, h, embedding, checkpointed)
        return self.head(run_block(self.middle, h, embedding, checkpointed))  # [B x num_classes]


def resolve_model_config(**overrides):
    """Defaults + overrides -> the complete plain dict a checkpoint stores (lists, ints, floats)."""
    unknown = set(overrides) - set(DEFAULT_MODEL_CONFIG)
    if unknown:
        raise UsageError(f"unknown model settings: {sorted(unknown)} (a checkpoint written by a newer version, or "
                         "edited?)")
    config = {**DEFAULT_MODEL_CONFIG, **{k: v for k, v in overrides.items() if v is not None}}
    config["channel_mults"] = [int(m) for m in config["channel_mults"]]
    if config["out_channels"] is None:
        config["out_channels"] = config["in_channels"]
    if config["attention_resolutions"] is None:
        config["attention_resolutions"] = default_attention_resolutions(config["image_size"], config["channel_mults"])
    config["attention_resolutions"] = [int(r) for r in config["attention_resolutions"]]
    return config


def build_model(config):
    """Rebuild the UNet from the plain dict stored in a checkpoint (see resolve_model_config)."""
    return UNet(**resolve_model_config(**config))


# The noisy classifier takes the UNet's settings, minus those only a denoiser has.
CLASSIFIER_ONLY_UNET = ("out_channels", "cond_channels", "cond_augment")


def resolve_classifier_config(**overrides):
    """Like resolve_model_config, for NoisyClassifier (num_classes must be given)."""
    config = resolve_model_config(**overrides)
    for name in CLASSIFIER_ONLY_UNET:
        config.pop(name)
    return config


def build_classifier(config):
    """Rebuild the NoisyClassifier from the plain dict stored in its checkpoint."""
    return NoisyClassifier(**resolve_classifier_config(**config))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
