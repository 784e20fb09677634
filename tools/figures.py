"""
The README's teaching figures, each made by one command so that a reader can make them again:

    python tools/figures.py forward --image data/cars/some_class/00001.jpg   # images/forward_process.png
    python tools/figures.py schedules                                        # images/schedules.png
    python tools/figures.py training --ckpts checkpoints/cars_step*.pt       # images/training_raw_vs_ema.png

forward     q(x_t | x_0) of DDPM eq. 4 applied to one real image at several t, for the linear and
            the cosine schedule (one row each), with the same noise eps in every column: the
            image fades into that noise, and the cosine schedule (Improved DDPM eq. 17) keeps it
            visible for longer.
schedules   alpha_bar_t (the signal's share of the variance) and log SNR = log(alpha_bar_t /
            (1 - alpha_bar_t)) against t/T, for both schedules at several T. The linear schedule's
            betas are scaled by 1000/T (Improved DDPM), so its curves nearly coincide across T.
training    samples from the same noise by the raw and the EMA weights of several step-numbered full
            checkpoints (train.py --keep_last N): a row per checkpoint, raw on the left, EMA on the
            right. Early on the EMA still remembers the random start; later it is the smoother one.

The reverse process as a GIF is sample.py --gif, and quality against the number of sampling steps is
tools/sampler_sweep.py --plot.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm import GaussianDiffusion  # noqa: E402
from model import build_model  # noqa: E402
from utils import (UsageError, check_output_file, from_model_range, load_checkpoint, load_image, load_weights,  # noqa: E402
                   make_grid_image, make_shapes_dataset, to_model_range)

SCHEDULE_NAMES = ("linear", "cosine")


def forward_figure(image_uint8, timesteps, t_values, path, seed=0):
    """A grid [2 schedules x len(t_values)] of x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    (DDPM eq. 4), one eps for all. image_uint8 [C x S x S]. Returns the PIL image it saved."""
    x0 = to_model_range(image_uint8[None])                              # [1 x C x S x S] in [-1, 1]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(t_values)
    rows = []
    for schedule in SCHEDULE_NAMES:
        diffusion = GaussianDiffusion(timesteps, schedule)
        rows.append(diffusion.q_sample(x0.expand(len(t), -1, -1, -1), t, eps.expand(len(t), -1, -1, -1)))
    grid = make_grid_image(from_model_range(torch.cat(rows).clamp(-1, 1)), nrow=len(t_values))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return grid


def schedule_curves(timesteps):
    """{schedule: (t/T [T], alpha_bar_t [T], log SNR [T])} for code t = 0 .. T-1 (paper t = 1 .. T)."""
    curves = {}
    for schedule in SCHEDULE_NAMES:
        alpha_bar = GaussianDiffusion(timesteps, schedule).alphas_cumprod.double()
        fraction = (torch.arange(timesteps, dtype=torch.float64) + 1) / timesteps
        curves[schedule] = (fraction, alpha_bar, torch.log(alpha_bar / (1 - alpha_bar)))
    return curves


def schedules_figure(timesteps_list, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for schedule, style in zip(SCHEDULE_NAMES, ("-", "--")):
        for timesteps in timesteps_list:
            fraction, alpha_bar, log_snr = schedule_curves(timesteps)[schedule]
            label = f"{schedule}, T={timesteps}"
            left.plot(fraction, alpha_bar, style, lw=1.2, label=label)
            right.plot(fraction, log_snr, style, lw=1.2, label=label)
    left.set(xlabel="t / T", ylabel="alpha_bar_t", title="signal left in x_t (DDPM eq. 4)")
    right.set(xlabel="t / T", ylabel="log SNR = log(alpha_bar / (1 - alpha_bar))", title="signal-to-noise ratio")
    left.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def training_figure(checkpoint_paths, path, num_samples=4, sample_steps=50, seed=0):
    """One row per full checkpoint: num_samples from the raw weights, then from the EMA, all from the
    same noise, drawn with Algorithm 2 respaced to sample_steps (Improved DDPM eq. 19)."""
    from improved_ddpm import respace
    rows, steps = [], []
    for ckpt in checkpoint_paths:
        state = load_checkpoint(ckpt, required=("model_config", "diffusion_config"), flag="--ckpts", task="diffusion")
        if "model" not in state or "ema" not in state:  # an <run>_ema.pt holds the EMA weights alone
            raise UsageError(f"--ckpts {ckpt}: holds one set of weights; pass full checkpoints (<run>.pt or "
                             "<run>_step<N>.pt), which hold the raw weights and the EMA")
        config, size = state["model_config"], state["model_config"]["image_size"]
        if rows and rows[0].shape[1:] != (config["in_channels"], size, size):  # one grid: one image shape
            raise UsageError(f"--ckpts {ckpt}: {size}x{size} images with {config['in_channels']} channel(s), unlike "
                             f"{checkpoint_paths[0]}'s; pass checkpoints of one run")
        diffusion = GaussianDiffusion(**state["diffusion_config"])
        if sample_steps < diffusion.timesteps:
            diffusion = respace(diffusion, sample_steps)
        noise = torch.randn(num_samples, config["in_channels"], size, size, generator=torch.Generator().manual_seed(seed))
        labels = torch.arange(num_samples) % config["num_classes"] if config.get("num_classes") else None
        row = []
        for weights in ("model", "ema"):
            model = build_model(config)
            load_weights(model, state[weights], ckpt)
            # the same per-step noise for raw and EMA; seed + 1, not seed, which drew x_T above: on a CPU
            # the first step's z would be x_T itself (as in sampler_sweep.draw_samples)
            torch.manual_seed(seed + 1)
            row.append(diffusion.sample(model.eval(), noise.shape, labels, noise=noise, progress=False))
        rows.append(torch.cat(row))
        steps.append(state["step"])
    grid = make_grid_image(from_model_range(torch.cat(rows)), nrow=2 * num_samples)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return steps


def main(argv=None):
    p = argparse.ArgumentParser(description="The README's teaching figures.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)
    forward = sub.add_parser("forward", help="the forward process on one real image")
    forward.add_argument("--image", default=None, help="an image file; default: a picture from the built-in shapes")
    forward.add_argument("--image_size", type=int, default=64)
    forward.add_argument("--timesteps", type=int, default=1000)
    forward.add_argument("--t", type=int, nargs="+", default=[0, 50, 100, 200, 300, 500, 700, 999],
                         help="code timesteps, 0 .. T-1")
    forward.add_argument("--out", default="images/forward_process.png")
    schedules = sub.add_parser("schedules", help="alpha_bar and SNR curves")
    schedules.add_argument("--timesteps", type=int, nargs="+", default=[100, 1000, 4000])
    schedules.add_argument("--out", default="images/schedules.png")
    training = sub.add_parser("training", help="raw against EMA samples across training")
    training.add_argument("--ckpts", nargs="+", required=True, help="full checkpoints, e.g. checkpoints/cars_step*.pt")
    training.add_argument("--num_samples", type=int, default=4)
    training.add_argument("--sample_steps", type=int, default=50)
    training.add_argument("--out", default="images/training_raw_vs_ema.png")
    args = p.parse_args(argv)

    # The figure's file, checked before any work: Pillow (forward, training) picks the format by the name.
    check_output_file(args.out, "--out", None if args.figure == "schedules" else (".png", ".jpg", ".jpeg", ".webp"))
    if args.figure == "forward":
        if args.image_size < 1 or args.timesteps < 1:
            raise UsageError(f"--image_size {args.image_size}, --timesteps {args.timesteps}: at least 1 each")
        bad = [t for t in args.t if not 0 <= t < args.timesteps]
        if bad:
            raise UsageError(f"--t {bad[0]}: timesteps are 0 .. T-1 = {args.timesteps - 1}")
        if args.image:
            if not os.path.isfile(args.image):
                raise UsageError(f"--image {args.image}: no such file")
            try:
                image = load_image(args.image, args.image_size, 3)
            except OSError as error:  # empty, truncated or not an image (PIL.UnidentifiedImageError too)
                raise UsageError(f"--image {args.image}: Pillow cannot read it ({error}); pass a .png or .jpg "
                                 "image") from None
        else:
            image = make_shapes_dataset(num_images=1, image_size=args.image_size)[0][0]
        forward_figure(image, args.timesteps, args.t, args.out)
        print(f"forward process at t = {args.t} (rows: linear, cosine) -> {args.out}")
    elif args.figure == "schedules":
        schedules_figure(args.timesteps, args.out)
        print(f"alpha_bar and log SNR for T = {args.timesteps} -> {args.out}")
    else:
        if args.num_samples < 1 or args.sample_steps < 1:  # (respace would name --steps, sample.py's flag)
            raise UsageError(f"--num_samples {args.num_samples}, --sample_steps {args.sample_steps}: at least 1 each")
        ckpts = sorted(args.ckpts)
        steps = training_figure(ckpts, args.out, args.num_samples, args.sample_steps)
        print(f"raw | EMA samples at steps {steps} -> {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
