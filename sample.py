"""
sample.py: draw images from a trained checkpoint with Algorithm 2 of Ho et al. (ddpm.py).

    python sample.py --ckpt checkpoints/cars_ema.pt                     # a grid in samples/cars_ema.png
    python sample.py --ckpt checkpoints/cars_ema.pt --num_samples 64 --individual_dir out/ --gif rev.gif

The checkpoint describes itself (model and diffusion configuration, class names), so no other flag
is needed. Either file works: <run>_ema.pt, or the full <run>.pt (sampled with its EMA weights,
which give better images than the raw training weights).
"""
import argparse
import os
import sys

import torch
from PIL import Image

from ddpm import VARIANCES, GaussianDiffusion
from model import build_model
from utils import (HelpFormatter, UsageError, from_model_range, load_checkpoint, load_weights, make_grid_image,
                   pick_device, save_gif, save_grid, seed_everything)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images from a checkpoint written by train.py.",
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoints/<run>_ema.pt or checkpoints/<run>.pt")
    p.add_argument("--num_samples", type=int, default=16, help="how many images to draw")
    p.add_argument("--batch_size", type=int, default=64, help="images denoised at once (lower it if memory is short)")
    p.add_argument("--seed", type=int, default=0, help="seed for the starting noise and every step's noise")
    p.add_argument("--out", default=None, help="grid PNG; default samples/<checkpoint name>.png")
    p.add_argument("--individual_dir", default=None, help="also write one PNG per sample into this folder")
    p.add_argument("--gif", default=None, help="also write the reverse process of the first batch as a GIF "
                   "(x_t on the left, the predicted x_0 on the right)")
    p.add_argument("--gif_frames", type=int, default=50, help="frames in the GIF")
    p.add_argument("--variance", default=None, choices=VARIANCES,
                   help="sigma_t^2 of each step: posterior (beta~_t) or beta (beta_t); default: the checkpoint's")
    p.add_argument("--no_clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or args.gif_frames < 1:
        raise UsageError("--num_samples, --batch_size and --gif_frames must be at least 1")
    state = load_checkpoint(args.ckpt, required=("model_config", "diffusion_config", "ema"))
    device = pick_device(args.device)
    seed_everything(args.seed)

    model = build_model(state["model_config"])
    load_weights(model, state["ema"], args.ckpt)
    model = model.to(device).eval()
    diffusion_config = dict(state["diffusion_config"], **({"variance": args.variance} if args.variance else {}))
    diffusion = GaussianDiffusion(**diffusion_config).to(device)
    class_names = state.get("class_names") or []
    size, channels = state["model_config"]["image_size"], state["model_config"]["in_channels"]
    print(f"{args.ckpt}: step {state.get('step')}, {size}x{size}x{channels}, "
          f"{len(class_names) or 'no'} classes; {diffusion.describe()}")

    images, trajectory = [], None
    for start in range(0, args.num_samples, args.batch_size):
        b = min(args.batch_size, args.num_samples - start)
        # A class-conditional model draws the classes in turn: sample i has label i mod #classes.
        y = (torch.arange(start, start + b, device=device) % len(class_names)) if class_names else None
        every = max(1, diffusion.timesteps // args.gif_frames) if (args.gif and trajectory is None) else 0
        out = diffusion.sample(model, (b, channels, size, size), y, clip_denoised=not args.no_clip,
                               trajectory_every=every)
        if every:
            out, trajectory = out
        images.append(from_model_range(out))
        print(f"sampled {start + b}/{args.num_samples}")
    images = torch.cat(images)  # uint8 [N x C x S x S]

    out_path = args.out or os.path.join("samples", os.path.splitext(os.path.basename(args.ckpt))[0] + ".png")
    save_grid(images, out_path)
    print(f"grid of {len(images)} samples: {out_path}")
    if args.individual_dir:
        os.makedirs(args.individual_dir, exist_ok=True)
        for i, image in enumerate(images):
            array = image.permute(1, 2, 0).numpy()
            Image.fromarray(array[:, :, 0] if channels == 1 else array).save(
                os.path.join(args.individual_dir, f"sample_{i:05d}.png"))
        print(f"{len(images)} images: {args.individual_dir}/sample_00000.png ...")
    if args.gif:
        frames = []
        for _, xt, pred_x0 in trajectory:
            left, right = make_grid_image(from_model_range(xt[:16])), make_grid_image(from_model_range(pred_x0[:16]))
            frame = Image.new(left.mode, (left.width + right.width + 8, left.height), 255)
            frame.paste(left, (0, 0))
            frame.paste(right, (left.width + 8, 0))
            frames.append(frame)
        save_gif(frames, args.gif)
        print(f"reverse process, {len(frames)} frames: {args.gif}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
