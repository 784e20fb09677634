"""
train.py: train a DDPM on a folder of your images (or a built-in dataset) and write checkpoints.

    python train.py                                   # the offline built-in 'shapes' dataset
    python train.py --dataset_path data/cars          # your folder; class subfolders become labels
    python train.py --dataset_path data/cars --resume # continue from checkpoints/cars.pt

Every step is Algorithm 1 of Ho et al. (ddpm.py, GaussianDiffusion.training_loss) on a batch, or
with --loss hybrid / kl the variational-bound objectives of Improved DDPM (improved_ddpm.py);
--prediction, --learn_sigma, --min_snr_gamma and --timestep_sampler choose what the network
predicts, how each t is weighted and drawn. Around it sit the usual training aids: AdamW,
learning-rate warm-up then cosine decay, gradient clipping, gradient accumulation, an exponential
moving average (EMA) of the weights, and optional mixed precision. Outputs:
    checkpoints/<run>.pt       everything needed to resume (weights, EMA, optimizer, step, RNG, config)
    checkpoints/<run>_ema.pt   only what sampling needs (EMA weights, model and diffusion config, classes)
    samples/<run>/             sample grids from fixed noise, loss.csv and loss.png
Checkpoints are written atomically every --save_every steps, at the end, and on Ctrl-C.
"""
import argparse
import copy
import csv
import math
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

import improved_ddpm
from ddpm import LOSSES, PREDICTIONS, SCHEDULES, VLB_LOSSES, GaussianDiffusion
from improved_ddpm import TIMESTEP_SAMPLERS, TimestepSampler
from model import build_model, count_parameters, resolve_model_config
from utils import (HelpFormatter, ImageFolderDataset, UsageError, from_model_range, load_builtin_dataset,
                   load_checkpoint, load_weights, pick_device, plot_loss, save_checkpoint, save_grid,
                   seed_everything, to_model_range)

BUILTIN_DATASETS = ("shapes", "mnist", "fashion_mnist", "cifar10")
# Flags that only steer this run (where to write, how long, on what device): on --resume these come
# from the command line; every other setting comes from the checkpoint, so the run continues unchanged.
RUN_CONTROL_FLAGS = ("max_steps", "save_every", "sample_every", "num_samples", "device", "num_workers",
                     "checkpoint_dir", "sample_dir", "resume")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a DDPM (Ho et al. 2020) on a folder of images.",
                                formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset_path", default=None, help="folder of images; images in class subfolders "
                      "become labels, images directly inside mean unconditional")
    data.add_argument("--dataset", default=None, choices=BUILTIN_DATASETS, help="built-in dataset when no "
                      "--dataset_path: 'shapes' is generated offline; the others download via torchvision")
    data.add_argument("--image_size", type=int, default=32, help="images are resized and centre-cropped to this")
    data.add_argument("--channels", type=int, default=None, choices=(1, 3),
                      help="1 = grayscale, 3 = RGB; default: 3 if any image in the folder has colour")
    data.add_argument("--hflip", default="auto", choices=("auto", "on", "off"),
                      help="random horizontal flips; auto = on except for digits (mnist, fashion_mnist)")
    data.add_argument("--num_workers", type=int, default=None,
                      help="data-loading processes; default 0 on CPU (the model needs both cores), 4 on GPU")

    diffusion = p.add_argument_group("diffusion (ddpm.py; Improved DDPM options: improved_ddpm.py)")
    diffusion.add_argument("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    diffusion.add_argument("--schedule", default="linear", choices=SCHEDULES,
                           help="beta schedule: linear (DDPM) or cosine (Improved DDPM eq. 17)")
    diffusion.add_argument("--loss", default="l2", choices=LOSSES,
                           help="l2 is L_simple (eq. 14); l1, huber swap the distance; hybrid = L_simple + "
                           "0.001 L_vlb (Improved DDPM eq. 16, needs --learn_sigma); kl = L_vlb alone")
    diffusion.add_argument("--prediction", default="eps", choices=PREDICTIONS,
                           help="what the network predicts: the noise eps (DDPM), the image x0, or v "
                           "(Salimans & Ho 2022)")
    diffusion.add_argument("--learn_sigma", action="store_true",
                           help="the network also outputs the reverse variances (Improved DDPM eq. 15); "
                           "better with few sampling steps; use with --loss hybrid")
    diffusion.add_argument("--min_snr_gamma", type=float, default=0.0,
                           help="Min-SNR-gamma loss weighting (Hang et al. 2023); 5 is the paper's; 0 = off")
    diffusion.add_argument("--timestep_sampler", default="uniform", choices=TIMESTEP_SAMPLERS,
                           help="how t is drawn: uniform (Algorithm 1) or loss-aware importance sampling "
                           "(Improved DDPM, for --loss kl)")

    model = p.add_argument_group("model (model.py)")
    model.add_argument("--base_channels", type=int, default=32, help="UNet channels at full resolution")
    model.add_argument("--channel_mults", type=int, nargs="+", default=[1, 2, 2],
                       help="channel multiplier per UNet level; each extra level halves the resolution")
    model.add_argument("--num_res_blocks", type=int, default=2, help="residual blocks per level")
    model.add_argument("--attention_resolutions", type=int, nargs="*", default=None,
                       help="feature-map sizes that get self-attention; default: 8x8 and below (at least the lowest level)")
    model.add_argument("--dropout", type=float, default=0.1, help="dropout inside residual blocks")

    train = p.add_argument_group("optimisation")
    train.add_argument("--batch_size", type=int, default=64, help="images per micro-batch")
    train.add_argument("--accumulation_iters", type=int, default=1,
                       help="micro-batches per optimizer step (effective batch = batch_size x this)")
    train.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of AdamW (DDPM used 2e-4)")
    train.add_argument("--warmup_steps", type=int, default=200, help="linear learning-rate warm-up steps")
    train.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (DDPM used 1)")
    train.add_argument("--max_steps", type=int, default=10000, help="optimizer steps to train for")
    train.add_argument("--ema_decay", type=float, default=0.999,
                       help="EMA decay (with warm-up); 0.9999 as in DDPM suits runs of 100k+ steps")
    train.add_argument("--amp", action="store_true",
                       help="mixed precision: bf16 autocast on CPU/MPS, fp16 with a grad scaler on CUDA")
    train.add_argument("--seed", type=int, default=0, help="seed for weights, data order, noise")
    train.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")

    out = p.add_argument_group("output")
    out.add_argument("--run_name", default=None, help="default: the dataset folder's name (or the dataset's)")
    out.add_argument("--checkpoint_dir", default="checkpoints", help="where <run>.pt and <run>_ema.pt go")
    out.add_argument("--sample_dir", default="samples", help="where sample grids and the loss log go")
    out.add_argument("--save_every", type=int, default=500, help="steps between checkpoints")
    out.add_argument("--sample_every", type=int, default=1000, help="steps between sample grids (0 = never)")
    out.add_argument("--num_samples", type=int, default=16, help="images in each sample grid")
    out.add_argument("--resume", action="store_true", help="continue from <checkpoint_dir>/<run>.pt")
    args = p.parse_args(argv)
    return args, p


def check_args(args):
    """Catch bad settings before any work is done, each with the flag's name."""
    positive = ("image_size", "timesteps", "batch_size", "accumulation_iters", "max_steps", "base_channels",
                "num_res_blocks", "save_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be positive")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UsageError(f"--ema_decay {args.ema_decay}: must be in [0, 1)")
    if args.dataset_path and args.dataset:
        raise UsageError("give either --dataset_path (your folder) or --dataset (a built-in), not both")


def load_dataset(args):
    if args.dataset_path:
        return ImageFolderDataset(args.dataset_path, args.image_size, args.channels)
    dataset = load_builtin_dataset(args.dataset or "shapes", args.image_size)
    if args.channels and args.channels != dataset.channels:
        raise UsageError(f"--channels {args.channels}: the {args.dataset} dataset has {dataset.channels}")
    return dataset


def forever(loader):
    """Endless batches: a new shuffled pass over the data each time one ends."""
    while True:
        yield from loader


def lr_lambda(step, warmup_steps, max_steps):
    """Learning-rate factor: linear warm-up to 1 over warmup_steps, then half a cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def update_ema(ema_model, model, decay, step):
    """ema <- decay * ema + (1 - decay) * weights, with a warm-up so early, random weights are
    forgotten quickly: the decay actually used is min(decay, (1 + step) / (10 + step))."""
    decay = min(decay, (1 + step) / (10 + step))
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def stop_like_ctrl_c(signum, frame):
    """A cluster scheduler's SIGTERM is treated like Ctrl-C: save a checkpoint, then exit."""
    raise KeyboardInterrupt


class NonFiniteLoss(Exception):
    pass


def accumulate_gradients(loss_fn, micro_batches, scaler):
    """Backpropagate k micro-batches so that the summed gradient equals the gradient of one batch
    k times larger: each micro-batch's mean loss is divided by k before backward(). Returns the
    mean loss over the k micro-batches. loss_fn(batch) -> (mean loss, t [B])."""
    k, total = len(micro_batches), 0.0
    for batch in micro_batches:
        loss, t = loss_fn(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} (t values in the batch: {t.tolist()})")
        scaler.scale(loss / k).backward()
        total += loss.item() / k
    return total


def checkpoint_states(step, model, ema_model, optimizer, scheduler, scaler, config, model_config,
                      diffusion_config, class_names, timestep_sampler):
    """The two checkpoint dicts, all plain Python types and tensors (loadable with weights_only=True)."""
    describes_itself = dict(model_config=model_config, diffusion_config=diffusion_config,
                            class_names=class_names, step=step)
    ema_state = dict(kind="ema", ema=ema_model.state_dict(), **describes_itself)
    full_state = dict(kind="full", model=model.state_dict(), ema=ema_model.state_dict(),
                      optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                      scaler=scaler.state_dict(), config=config, timestep_sampler=timestep_sampler.state_dict(),
                      rng=dict(torch=torch.get_rng_state(),
                               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
                      **describes_itself)
    return full_state, ema_state


def main(argv=None):
    args, parser = parse_args(argv)
    run_name = args.run_name or (os.path.basename(os.path.normpath(args.dataset_path)) if args.dataset_path
                                 else args.dataset or "shapes")
    full_path = os.path.join(args.checkpoint_dir, f"{run_name}.pt")
    ema_path = os.path.join(args.checkpoint_dir, f"{run_name}_ema.pt")

    resumed = None
    if args.resume:
        if not os.path.isfile(full_path):
            raise UsageError(f"--resume: no checkpoint {full_path} to resume from; train without --resume first, "
                             "or pass the --run_name / --checkpoint_dir it was saved under")
        resumed = load_checkpoint(full_path, required=("config", "model", "ema", "optimizer", "step"))
        saved = resumed["config"]
        for name in RUN_CONTROL_FLAGS:  # explicitly given run-control flags win; the rest is the saved run
            if getattr(args, name) != parser.get_default(name) and name in saved:
                saved[name] = getattr(args, name)
        args = argparse.Namespace(**{**vars(args), **saved, "resume": True})
    check_args(args)

    device = pick_device(args.device)
    seed_everything(args.seed)
    # Diffusion before data: it checks that the loss, prediction and variance settings fit together.
    diffusion = GaussianDiffusion(args.timesteps, args.schedule, args.loss, prediction=args.prediction,
                                  learn_sigma=args.learn_sigma, min_snr_gamma=args.min_snr_gamma).to(device)
    timestep_sampler = TimestepSampler(args.timesteps, args.timestep_sampler)
    dataset = load_dataset(args)
    class_names = list(dataset.class_names) if len(dataset.class_names) > 1 else []
    hflip = args.hflip == "on" or (args.hflip == "auto" and args.dataset not in ("mnist", "fashion_mnist"))
    if len(dataset) < args.batch_size:
        print(f"note: the dataset has only {len(dataset)} images; --batch_size lowered from {args.batch_size}")
        args.batch_size = len(dataset)

    model_config = resolve_model_config(
        image_size=args.image_size, in_channels=dataset.channels, base_channels=args.base_channels,
        out_channels=dataset.channels * (2 if args.learn_sigma else 1),  # learned variances: 2x channels
        channel_mults=args.channel_mults, num_res_blocks=args.num_res_blocks,
        attention_resolutions=args.attention_resolutions, dropout=args.dropout, num_classes=len(class_names))
    model = build_model(model_config).to(device)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)  # a separate copy, never the live weights

    # AdamW; the fused kernel on CUDA, the multi-tensor ("foreach") one elsewhere.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, args.warmup_steps, args.max_steps))
    use_fp16 = args.amp and device.type == "cuda"  # fp16 needs loss scaling; bf16 (CPU, MPS) does not
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)
    autocast = torch.autocast(device.type, dtype=torch.float16 if use_fp16 else torch.bfloat16, enabled=args.amp)

    step = 0
    if resumed:
        if resumed["model_config"] != model_config:  # e.g. a class folder was added since
            saved_config = resumed["model_config"]
            changed = [k for k in model_config if saved_config.get(k) != model_config[k]]
            was = ", ".join(f"{k}={saved_config.get(k)}" for k in changed)
            now = ", ".join(f"{k}={model_config[k]}" for k in changed)
            raise UsageError(f"--resume: {full_path} was trained with {was}, but the data now gives {now}; "
                             "restore the dataset or start a new --run_name")
        load_weights(model, resumed["model"], full_path)
        load_weights(ema_model, resumed["ema"], full_path)
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        torch.set_rng_state(resumed["rng"]["torch"])
        if device.type == "cuda" and resumed["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(resumed["rng"]["cuda"])
        step = resumed["step"]
        if "timestep_sampler" in resumed:
            timestep_sampler.load_state_dict(resumed["timestep_sampler"])

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    config["run_name"] = run_name
    print(f"run {run_name}: {len(dataset)} images ({dataset.channels}-channel, {args.image_size}x{args.image_size}), "
          f"{len(class_names) or 'no'} classes, device {device}{', resuming at step ' + str(step) if resumed else ''}")
    print(diffusion.describe())
    print(f"model: {count_parameters(model) / 1e6:.2f} M parameters, {model_config}")
    print("settings:", {k: v for k, v in config.items() if k not in model_config})

    num_workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=num_workers > 0)
    batches = forever(loader)

    def loss_fn(batch):
        images, labels = batch
        x0 = to_model_range(images.to(device, non_blocking=True))           # uint8 -> [-1, 1]
        if hflip:  # flip a random half of the batch, each image on its own coin
            flip = torch.rand(x0.shape[0], device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        y = labels.to(device) if class_names else None
        t, weights = timestep_sampler.sample(x0.shape[0], device)           # Alg. 1 line 3 (weights 1 if uniform)
        with autocast:
            if args.loss in VLB_LOSSES:
                losses, t = improved_ddpm.training_loss(diffusion, model, x0, y, t)   # IDDPM eq. 16 / L_vlb
            else:
                losses, t = diffusion.training_loss(model, x0, y, t)        # Algorithm 1
        timestep_sampler.update(t, losses)
        return (losses.float() * weights).mean(), t

    # Fixed noise (and labels) for every sample grid, so grids over training are comparable.
    generator = torch.Generator().manual_seed(args.seed)
    fixed_noise = torch.randn(args.num_samples, dataset.channels, args.image_size, args.image_size,
                              generator=generator).to(device)
    fixed_labels = (torch.arange(args.num_samples, device=device) % len(class_names)) if class_names else None
    run_sample_dir = os.path.join(args.sample_dir, run_name)
    os.makedirs(run_sample_dir, exist_ok=True)
    log_path = os.path.join(run_sample_dir, "loss.csv")
    if not resumed or not os.path.isfile(log_path):
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "loss", "lr", "images_per_s"])
    log_rows = []

    def flush_log():
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerows(log_rows)
        log_rows.clear()
        with open(log_path) as f:
            rows = list(csv.reader(f))[1:]
        if len(rows) >= 2:
            plot_loss([int(r[0]) for r in rows], [float(r[1]) for r in rows], os.path.join(run_sample_dir, "loss.png"))

    def save():
        full_state, ema_state = checkpoint_states(step, model, ema_model, optimizer, scheduler, scaler, config,
                                                  model_config, diffusion.config(), class_names, timestep_sampler)
        save_checkpoint(full_state, full_path)
        save_checkpoint(ema_state, ema_path)

    def sample_grid():
        images = diffusion.sample(ema_model, fixed_noise.shape, fixed_labels, noise=fixed_noise, progress=False)
        path = os.path.join(run_sample_dir, f"step_{step:07d}.png")
        save_grid(from_model_range(images), path)
        return path

    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    model.train()
    bar = tqdm(total=args.max_steps, initial=step, desc=run_name, dynamic_ncols=True)
    try:
        while step < args.max_steps:
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(args.accumulation_iters)]
            try:
                loss = accumulate_gradients(loss_fn, micro_batches, scaler)
            except NonFiniteLoss as error:
                raise UsageError(f"step {step}: {error}. Stopped without saving; the last good checkpoint "
                                 f"{full_path} is kept. Try a lower --lr or without --amp") from None
            scaler.unscale_(optimizer)  # clip the true gradient, not the loss-scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            update_ema(ema_model, model, args.ema_decay, step)
            step += 1

            images_per_s = args.batch_size * args.accumulation_iters / (time.perf_counter() - started)
            lr = scheduler.get_last_lr()[0]
            log_rows.append([step, f"{loss:.6f}", f"{lr:.3e}", f"{images_per_s:.1f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
            if step % args.save_every == 0 or step == args.max_steps:
                flush_log()
                save()
            if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
                bar.write(f"step {step}: samples in {sample_grid()}")
    except KeyboardInterrupt:
        bar.close()
        flush_log()
        save()
        print(f"\ninterrupted at step {step}: saved {full_path} and {ema_path}; continue with --resume")
        sys.exit(130)
    bar.close()
    flush_log()
    print(f"done at step {step}: {full_path} (to resume) and {ema_path} (to sample: "
          f"python sample.py --ckpt {ema_path})")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
