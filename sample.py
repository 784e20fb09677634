"""
sample.py: draw images from a trained checkpoint.

    python sample.py --ckpt checkpoints/cars_ema.pt                          # Algorithm 2, all T steps
    python sample.py --ckpt checkpoints/cars_ema.pt --sampler ddim --steps 50 # DDIM (ddim.py): 20x fewer calls
    python sample.py --ckpt checkpoints/cars_ema.pt --steps 100              # DDPM respaced (improved_ddpm.py)
    python sample.py --ckpt checkpoints/cars_ema.pt --interpolate 10         # slerp between two x_T, decoded by DDIM
    python sample.py --ckpt checkpoints/cars_ema.pt --invert my_photos/      # image -> x_T -> image (DDIM inversion)
    python sample.py --ckpt checkpoints/cars_ema.pt --num_samples 64 --individual_dir out/ --gif rev.gif

The checkpoint describes itself (model and diffusion configuration, class names, the prediction
target, learned variances), so no other flag is needed. Either file works: <run>_ema.pt, or the
full <run>.pt (sampled with its EMA weights, which give better images than the raw training weights).
"""
import argparse
import os
import sys
import time

import torch
from PIL import Image

from ddim import SPACINGS, ddim_invert, ddim_sample, interpolation_noise
from ddpm import VARIANCES, GaussianDiffusion
from improved_ddpm import respace
from model import build_model
from utils import (HelpFormatter, UsageError, from_model_range, is_image_file, list_images, load_checkpoint,
                   load_image, load_weights, make_grid_image, pick_device, save_gif, save_grid, seed_everything,
                   to_model_range)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images from a checkpoint written by train.py.",
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoints/<run>_ema.pt or checkpoints/<run>.pt")
    p.add_argument("--num_samples", type=int, default=None,
                   help="images to draw (default 16); rows of the --interpolate strip (default 4); "
                   "images to --invert (default: all, at most 16)")
    p.add_argument("--batch_size", type=int, default=64, help="images denoised at once (lower it if memory is short)")
    p.add_argument("--seed", type=int, default=0, help="seed for the starting noise and every step's noise")
    p.add_argument("--out", default=None, help="grid PNG; default samples/<checkpoint name>[_interpolation|_inversion].png")
    p.add_argument("--individual_dir", default=None, help="also write one PNG per sample into this folder")
    p.add_argument("--gif", default=None, help="also write the reverse process of the first batch as a GIF "
                   "(x_t on the left, the predicted x_0 on the right)")
    p.add_argument("--gif_frames", type=int, default=50, help="frames in the GIF")
    sampler = p.add_argument_group("sampler")
    sampler.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"),
                         help="ddpm: Algorithm 2 (ancestral), respaced when --steps < T; ddim: DDIM eq. 12")
    sampler.add_argument("--steps", type=int, default=None,
                         help="network calls per image: default all T for ddpm, 50 for ddim")
    sampler.add_argument("--eta", type=float, default=None,
                         help="DDIM noise scale (eq. 16): 0 = deterministic (default), 1 = DDPM-like")
    sampler.add_argument("--spacing", default="uniform", choices=SPACINGS,
                         help="which --steps of the T: evenly spaced, or quadratic (dense near t = 0; DDIM's CIFAR-10)")
    sampler.add_argument("--variance", default=None, choices=VARIANCES,
                         help="ddpm sigma_t^2: posterior (beta~_t), beta (beta_t), or learned (Improved DDPM "
                         "models); default: the checkpoint's")
    sampler.add_argument("--no_clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    sampler.add_argument("--interpolate", type=int, default=None, metavar="N",
                         help="instead of samples: rows of N images decoded by DDIM (eta 0) from a spherical "
                         "interpolation between two random x_T (as in the DDIM paper)")
    sampler.add_argument("--invert", default=None, metavar="PATH",
                         help="instead of samples: encode these images (a file or a folder) to x_T with DDIM "
                         "inversion and decode them back; writes originals over reconstructions")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    return p.parse_args(argv)


def check_args(args, timesteps):
    """Bad combinations, each named with its flag, before any work."""
    if (args.num_samples is not None and args.num_samples < 1) or args.batch_size < 1 or args.gif_frames < 1:
        raise UsageError("--num_samples, --batch_size and --gif_frames must be at least 1")
    if args.interpolate is not None and args.interpolate < 2:
        raise UsageError(f"--interpolate {args.interpolate}: need at least 2 images per row (the two ends)")
    if args.interpolate and args.invert:
        raise UsageError("give --interpolate or --invert, not both")
    deterministic_mode = args.interpolate or args.invert
    if args.sampler == "ddpm" and not deterministic_mode and args.eta is not None:
        raise UsageError("--eta is DDIM's noise scale (eq. 16); add --sampler ddim")
    if deterministic_mode and args.eta:
        raise UsageError("--interpolate and --invert use deterministic DDIM (eta 0); leave out --eta")
    if args.eta is not None and args.eta < 0:
        raise UsageError(f"--eta {args.eta}: must be >= 0 (0 = DDIM, 1 = DDPM-like)")
    if args.invert and not os.path.exists(args.invert):
        raise UsageError(f"--invert {args.invert}: no such file or folder")
    if args.steps is not None and not 1 <= args.steps <= timesteps:
        raise UsageError(f"--steps {args.steps}: must be between 1 and the model's T = {timesteps}")


def load_images_to_invert(path, limit, size, channels, class_names):
    """uint8 [N x C x S x S] and labels (int64 [N] or None) for --invert. A class-conditional model
    needs each image's class: it is read from the name of the folder holding the image."""
    paths = [path] if os.path.isfile(path) else list_images(path)
    if os.path.isfile(path) and not is_image_file(path):
        raise UsageError(f"--invert {path}: not an image file")
    if not paths:
        raise UsageError(f"--invert {path}: no images found in this folder")
    paths = paths[:limit]
    images = torch.stack([load_image(p, size, channels) for p in paths])
    if not class_names:
        return images, None
    labels = []
    for p in paths:
        folder = os.path.basename(os.path.dirname(os.path.abspath(p)))
        if folder not in class_names:
            raise UsageError(f"--invert {p}: this model is class-conditional and '{folder}' is not one of its "
                             f"classes ({', '.join(class_names[:5])}...); put the image in a folder named after its class")
        labels.append(class_names.index(folder))
    return images, torch.tensor(labels)


def main(argv=None):
    args = parse_args(argv)
    state = load_checkpoint(args.ckpt, required=("model_config", "diffusion_config", "ema"))
    diffusion_config = dict(state["diffusion_config"], **({"variance": args.variance} if args.variance else {}))
    diffusion = GaussianDiffusion(**diffusion_config)
    check_args(args, diffusion.timesteps)
    device = pick_device(args.device)
    seed_everything(args.seed)

    model = build_model(state["model_config"])
    load_weights(model, state["ema"], args.ckpt)
    model = model.to(device).eval()
    diffusion = diffusion.to(device)
    class_names = state.get("class_names") or []
    size, channels = state["model_config"]["image_size"], state["model_config"]["in_channels"]
    print(f"{args.ckpt}: step {state.get('step')}, {size}x{size}x{channels}, "
          f"{len(class_names) or 'no'} classes; {diffusion.describe()}")

    # Which sampler, with how many network calls per image.
    use_ddim = args.sampler == "ddim" or bool(args.interpolate or args.invert)
    steps = args.steps or (min(50, diffusion.timesteps) if use_ddim else diffusion.timesteps)
    eta = args.eta or 0.0
    sampling_diffusion = diffusion
    if not use_ddim and steps < diffusion.timesteps:
        sampling_diffusion = respace(diffusion, steps, args.spacing)  # Improved DDPM Sec. 4, eq. 19
    print(f"sampler: {'DDIM eta=' + format(eta, 'g') if use_ddim else 'DDPM (Algorithm 2)'}, "
          f"{steps} of {diffusion.timesteps} steps ({args.spacing} spacing)")

    def generate(noise, y, trajectory_every=0):
        if use_ddim:
            return ddim_sample(diffusion, model, noise.shape, steps, eta, args.spacing, y, noise,
                               clip_denoised=not args.no_clip, trajectory_every=trajectory_every)
        return sampling_diffusion.sample(model, noise.shape, y, noise, clip_denoised=not args.no_clip,
                                         trajectory_every=trajectory_every)

    def in_batches(noise, labels):
        """Decode x_T [N x C x S x S] batch by batch; returns uint8 images."""
        out = []
        for start in range(0, len(noise), args.batch_size):
            y = labels[start:start + args.batch_size].to(device) if labels is not None else None
            out.append(from_model_range(generate(noise[start:start + args.batch_size].to(device), y)).cpu())
        return torch.cat(out)

    name = os.path.splitext(os.path.basename(args.ckpt))[0]
    started = time.perf_counter()
    if args.interpolate:
        # Each row: two random x_T and the slerp between them, every point decoded deterministically.
        rows = args.num_samples or 4
        ends = torch.randn(rows, 2, channels, size, size)
        noise = torch.cat([interpolation_noise(ends[r, 0], ends[r, 1], args.interpolate) for r in range(rows)])
        labels = (torch.arange(rows).repeat_interleave(args.interpolate) % len(class_names)) if class_names else None
        images = in_batches(noise, labels)
        out_path = args.out or os.path.join("samples", f"{name}_interpolation.png")
        save_grid(images, out_path, nrow=args.interpolate)
        print(f"{rows} interpolation rows of {args.interpolate} in {time.perf_counter() - started:.1f} s: {out_path}")
        return

    if args.invert:
        originals, labels = load_images_to_invert(args.invert, args.num_samples or 16, size, channels, class_names)
        x0 = to_model_range(originals)
        latents = []
        for start in range(0, len(x0), args.batch_size):
            y = labels[start:start + args.batch_size].to(device) if labels is not None else None
            latents.append(ddim_invert(diffusion, model, x0[start:start + args.batch_size].to(device), steps,
                                       args.spacing, y).cpu())
        latents = torch.cat(latents)
        # Decode without clipping: inversion did not clip, and the round trip should retrace the same path.
        args.no_clip = True
        reconstructions = in_batches(latents, labels)
        error = (to_model_range(reconstructions) - x0).abs().mean().item()
        out_path = args.out or os.path.join("samples", f"{name}_inversion.png")
        # Rows of up to 8 originals, each above its reconstructions; a short last pair of rows is
        # padded with white so the pairs stay aligned.
        nrow = min(len(originals), 8)
        rows = []
        for i in range(0, len(x0), nrow):
            for part in (originals[i:i + nrow], reconstructions[i:i + nrow]):
                blank = torch.full((nrow - len(part), *part.shape[1:]), 255, dtype=torch.uint8)
                rows.append(torch.cat([part, blank]))
        save_grid(torch.cat(rows), out_path, nrow=nrow)
        print(f"{len(x0)} images -> x_T -> images in {time.perf_counter() - started:.1f} s, mean absolute error "
              f"{error:.4f} on [-1, 1]; originals above reconstructions: {out_path}")
        return

    num_samples = args.num_samples or 16
    images, trajectory = [], None
    for start in range(0, num_samples, args.batch_size):
        b = min(args.batch_size, num_samples - start)
        # A class-conditional model draws the classes in turn: sample i has label i mod #classes.
        y = (torch.arange(start, start + b, device=device) % len(class_names)) if class_names else None
        every = max(1, steps // args.gif_frames) if (args.gif and trajectory is None) else 0
        out = generate(torch.randn(b, channels, size, size, device=device), y, trajectory_every=every)
        if every:
            out, trajectory = out
        images.append(from_model_range(out).cpu())
        print(f"sampled {start + b}/{num_samples}")
    images = torch.cat(images)  # uint8 [N x C x S x S]
    elapsed = time.perf_counter() - started

    out_path = args.out or os.path.join("samples", f"{name}.png")
    save_grid(images, out_path)
    print(f"grid of {len(images)} samples in {elapsed:.1f} s ({steps} network calls each): {out_path}")
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
