"""
How fast is the model, and how close to the hardware? One table (and a JSON file) for one network:
parameters, FLOPs per image, training images/s and achieved GFLOP/s, peak memory, network evaluations
per second when sampling, and images/s for each sampler and step count.

    python tools/benchmark.py                                          # the default 32x32 UNet, on CPU or GPU
    python tools/benchmark.py --ckpt checkpoints/cars_ema.pt --json images/benchmark_cars.json
    python tools/benchmark.py --image_size 64 --base_channels 64 --channel_mults 1 2 2 2 --batch_size 32

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (a multiply-add is 2 FLOPs; matrix
products and convolutions, which are nearly all of the work). Training FLOPs are those of one
forward and backward pass, about 3x the forward's. Achieved GFLOP/s = training FLOPs per image x
images/s: against the device's peak it says how much of the hardware the model uses. Training is
Algorithm 1 (ddpm.py) with AdamW on random images, as train.py runs it, without data loading.
Sampling images/s are measured by running each sampler for its step count on one batch.
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddim import ddim_sample  # noqa: E402
from ddpm import GaussianDiffusion  # noqa: E402
from improved_ddpm import respace  # noqa: E402
from model import build_model, count_parameters, resolve_model_config  # noqa: E402
from utils import (UsageError, load_checkpoint, peak_memory_mb, pick_device, reset_peak_memory,  # noqa: E402
                   write_json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Training and sampling speed, FLOPs and memory of one network.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="benchmark this checkpoint's network (else the flags below)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--base_channels", type=int, default=32)
    p.add_argument("--channel_mults", type=int, nargs="+", default=[1, 2, 2])
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--num_classes", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64, help="images per training step and per sampling batch")
    p.add_argument("--train_steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"], choices=("ddpm", "ddim"))
    p.add_argument("--steps", type=int, nargs="+", default=[10, 50], help="sampling step counts to time")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--amp", default="off", choices=("off", "bf16"), help="bf16 autocast for training")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def count_flops(fn):
    """FLOPs of whatever fn() runs (FlopCounterMode counts matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network(args):
    """(model config, diffusion) from --ckpt or from the flags."""
    if args.ckpt:
        state = load_checkpoint(args.ckpt, required=("model_config", "diffusion_config"))
        if state.get("task", "diffusion") != "diffusion" or state["model_config"].get("cond_channels"):
            raise UsageError(f"--ckpt {args.ckpt}: only unconditioned or class-conditional diffusion models "
                             "are benchmarked so far")
        return state["model_config"], GaussianDiffusion(**state["diffusion_config"])
    config = resolve_model_config(image_size=args.image_size, in_channels=args.channels, out_channels=args.channels,
                                  base_channels=args.base_channels, channel_mults=args.channel_mults,
                                  num_res_blocks=args.num_res_blocks, num_classes=args.num_classes)
    return config, GaussianDiffusion(args.timesteps)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    config, diffusion = network(args)
    diffusion = diffusion.to(device)
    model = build_model(config).to(device)
    c, s, b = config["in_channels"], config["image_size"], args.batch_size
    labels = (lambda n: torch.randint(0, config["num_classes"], (n,), device=device)) if config.get("num_classes") \
        else (lambda n: None)
    x0 = torch.rand(b, c, s, s, device=device) * 2 - 1
    print(f"{count_parameters(model) / 1e6:.2f} M parameters, {s}x{s}x{c}, batch {b}, device {device}")

    # FLOPs per image: one forward, and one training step's forward and backward (Algorithm 1's loss).
    one = x0[:1]
    t_one = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        forward_flops = count_flops(lambda: model(one, t_one, labels(1)))
    train_flops = count_flops(lambda: diffusion.training_loss(model, one, labels(1))[0].mean().backward())
    model.zero_grad(set_to_none=True)

    # Training: Algorithm 1 + AdamW, timed after two warm-up steps.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    model.train()
    reset_peak_memory(device)
    for i in range(2 + args.train_steps):
        if i == 2:
            synchronize(device)
            started = time.perf_counter()
        with autocast:
            loss = diffusion.training_loss(model, x0, labels(b))[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    train_images_per_s = b * args.train_steps / (time.perf_counter() - started)
    train_peak = peak_memory_mb(device)

    # Sampling: network evaluations per second at this batch, then each sampler at each step count.
    model.eval()
    t_batch = torch.full((b,), diffusion.timesteps - 1, dtype=torch.long, device=device)
    with torch.no_grad():
        model(x0, t_batch, labels(b))  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for _ in range(5):
            model(x0, t_batch, labels(b))
        synchronize(device)
    evals_per_s = 5 / (time.perf_counter() - started)
    sampling = []
    for sampler in args.samplers:
        for steps in args.steps:
            synchronize(device)
            started = time.perf_counter()
            if sampler == "ddim":
                ddim_sample(diffusion, model, x0.shape, steps=steps, y=labels(b), progress=False)
            else:
                respaced = respace(diffusion, steps) if steps < diffusion.timesteps else diffusion
                respaced.sample(model, x0.shape, labels(b), progress=False)
            synchronize(device)
            seconds = time.perf_counter() - started
            sampling.append(dict(sampler=sampler, steps=steps, images_per_s=b / seconds, seconds_per_batch=seconds))

    result = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
                  "cpu", threads=torch.get_num_threads(), model_config=config,
                  parameters=count_parameters(model), batch_size=b, amp=args.amp,
                  forward_gflops_per_image=forward_flops / 1e9, train_gflops_per_image=train_flops / 1e9,
                  train_images_per_s=train_images_per_s, achieved_train_gflop_per_s=train_flops / 1e9 * train_images_per_s,
                  train_peak_memory_mb=train_peak, sampling_evals_per_s=evals_per_s * b,
                  sampling_batches_per_s=evals_per_s, sampling=sampling)
    print(f"| forward GFLOPs / image | {result['forward_gflops_per_image']:.3f} |")
    print(f"| training GFLOPs / image | {result['train_gflops_per_image']:.3f} |")
    print(f"| training images/s | {train_images_per_s:.1f} |")
    print(f"| achieved training GFLOP/s | {result['achieved_train_gflop_per_s']:.0f} |")
    print(f"| peak memory in training (MiB) | {train_peak:.0f} |")
    print(f"| sampling network evaluations/s (images x steps, batch {b}) | {evals_per_s * b:.0f} |")
    for row in sampling:
        print(f"| {row['sampler']} {row['steps']} steps: images/s | {row['images_per_s']:.2f} |")
    if args.json:
        write_json(args.json, result)
        print(f"results: {args.json}")
    return result


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
