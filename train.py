"""
train.py: train a DDPM on a folder of your images (or a built-in dataset) and write checkpoints.

    python train.py                                   # the offline built-in 'shapes' dataset
    python train.py --dataset_path data/cars          # your folder; class subfolders become labels
    python train.py --dataset_path data/cars --resume # continue from checkpoints/cars.pt
    python train.py --dataset_path data/cars --task super_resolution --low_res 32 --image_size 64
    python train.py --dataset_path data/cars --task classifier     # a noisy classifier for guidance

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

--task picks what is trained (cascade.py, guidance.py): 'diffusion' (the default; class subfolders make
it class-conditional, with classifier-free guidance's label dropout --p_uncond), 'classifier' (a
classifier of noisy images for classifier guidance), 'super_resolution' (a diffusion model conditioned on
a --low_res copy of each image, with conditioning augmentation) or 'image_to_image' (conditioned on a
paired input image from --cond_path).
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
import torch.nn.functional as F
from tqdm import tqdm

import cascade
import improved_ddpm
from cascade import TASKS
from ddpm import LOSSES, PREDICTIONS, SCHEDULES, VLB_LOSSES, GaussianDiffusion
from guidance import drop_labels
from improved_ddpm import TIMESTEP_SAMPLERS, TimestepSampler
from model import (build_classifier, build_model, count_parameters, resolve_classifier_config,
                   resolve_model_config)
from utils import (HelpFormatter, ImageFolderDataset, PairedImageDataset, UsageError, from_model_range,
                   load_builtin_dataset, load_checkpoint, load_weights, pick_device, plot_loss, save_checkpoint,
                   save_grid, seed_everything, to_model_range)

BUILTIN_DATASETS = ("shapes", "mnist", "fashion_mnist", "cifar10")
# Default run names: the dataset's name, plus this, so a folder's base, SR and classifier runs coexist.
RUN_SUFFIX = dict(diffusion="", classifier="_classifier", super_resolution="_sr", image_to_image="_i2i")
# Flags that only steer this run (where to write, how long, on what device): on --resume these come
# from the command line; every other setting comes from the checkpoint, so the run continues unchanged.
RUN_CONTROL_FLAGS = ("max_steps", "save_every", "sample_every", "num_samples", "sample_steps", "device", "num_workers",
                     "checkpoint_dir", "sample_dir", "resume")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a DDPM (Ho et al. 2020) on a folder of images.",
                                formatter_class=HelpFormatter)
    p.add_argument("--task", default="diffusion", choices=TASKS,
                   help="what to train: a diffusion model; a noisy-image classifier for classifier guidance; "
                   "a super-resolution model; an image-to-image model (cascade.py)")
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

    guidance = p.add_argument_group("conditioning (guidance.py, cascade.py)")
    guidance.add_argument("--p_uncond", type=float, default=0.1,
                          help="class-conditional runs: probability that a sample's label is replaced by 'no "
                          "label' (classifier-free guidance, Ho & Salimans 2022, Algorithm 1); 0 = never")
    guidance.add_argument("--low_res", type=int, default=None,
                          help="super_resolution: the input resolution; --image_size is the output's")
    guidance.add_argument("--aug_max_t", type=int, default=None,
                          help="super_resolution: conditioning augmentation (Cascaded Diffusion) noises the "
                          "low-res input to a random level 0..this; default T/10; 0 = off")
    guidance.add_argument("--sample_aug_t", type=int, default=None,
                          help="super_resolution: the fixed level used at sampling, saved in the checkpoint; "
                          "default T/50")
    guidance.add_argument("--cond_path", default=None,
                          help="image_to_image: folder of input images, named like their targets in --dataset_path")

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
    out.add_argument("--sample_steps", type=int, default=None,
                     help="network calls per image for the sample grids: all T (Algorithm 2) by default; fewer "
                     "respaces the sampler (Improved DDPM), e.g. 100, to spend less time drawing grids")
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
    if args.sample_steps is not None and not 1 <= args.sample_steps <= args.timesteps:
        raise UsageError(f"--sample_steps {args.sample_steps}: must be between 1 and --timesteps {args.timesteps}")
    if not 0.0 <= args.p_uncond < 1.0:
        raise UsageError(f"--p_uncond {args.p_uncond}: must be in [0, 1) (0.1 is the usual; 1 would never use the labels)")
    if args.dataset_path and args.dataset:
        raise UsageError("give either --dataset_path (your folder) or --dataset (a built-in), not both")
    if args.task == "super_resolution":
        if args.low_res is None or not 1 <= args.low_res < args.image_size:
            raise UsageError(f"--task super_resolution needs --low_res smaller than --image_size {args.image_size} "
                             "(for example --low_res 32 --image_size 64)")
        for name in ("aug_max_t", "sample_aug_t"):
            value = getattr(args, name)
            if value is not None and not 0 <= value < args.timesteps:
                raise UsageError(f"--{name} {value}: a level of the forward process, 0 .. T-1 = {args.timesteps - 1}")
    elif args.low_res is not None or args.aug_max_t is not None or args.sample_aug_t is not None:
        raise UsageError("--low_res, --aug_max_t and --sample_aug_t belong to --task super_resolution")
    if (args.task == "image_to_image") != (args.cond_path is not None) or (args.cond_path and not args.dataset_path):
        raise UsageError("--task image_to_image needs --dataset_path (targets) and --cond_path (inputs), "
                         "and --cond_path belongs to that task only")


def load_dataset(args):
    if args.task == "image_to_image":
        return PairedImageDataset(args.dataset_path, args.cond_path, args.image_size, args.channels)
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


def conditioning_settings(args):
    """What sample.py needs to feed an image-conditioned model, as a plain dict ({} for the others)."""
    if args.task == "super_resolution":
        return dict(low_res=args.low_res, aug_max_t=args.aug_max_t, sample_aug_t=args.sample_aug_t)
    return {}


def checkpoint_states(step, model, ema_model, optimizer, scheduler, scaler, config, model_config,
                      diffusion_config, class_names, timestep_sampler):
    """The two checkpoint dicts, all plain Python types and tensors (loadable with weights_only=True).
    task says what the network is (cascade.TASKS); conditioning holds a super-resolution model's
    low_res and augmentation levels; p_uncond tells sample.py whether the "no label" input was trained
    (classifier-free guidance)."""
    task = config["task"]
    describes_itself = dict(task=task, model_config=model_config, diffusion_config=diffusion_config,
                            class_names=class_names, step=step, conditioning=config["conditioning"],
                            p_uncond=config["p_uncond"] if class_names and task == "diffusion" else 0.0)
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
    run_name = args.run_name or ((os.path.basename(os.path.normpath(args.dataset_path)) if args.dataset_path
                                  else args.dataset or "shapes") + RUN_SUFFIX[args.task])
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
        if args.attention_resolutions is None:  # a run saved before configs stored the resolved default,
            args.attention_resolutions = resumed["model_config"]["attention_resolutions"]  # which has changed
    check_args(args)
    if args.task == "super_resolution":  # the defaults scale with T (see cascade.py)
        args.aug_max_t = args.timesteps // 10 if args.aug_max_t is None else args.aug_max_t
        args.sample_aug_t = args.timesteps // 50 if args.sample_aug_t is None else args.sample_aug_t

    device = pick_device(args.device)
    seed_everything(args.seed)
    # Diffusion before data: it checks that the loss, prediction and variance settings fit together.
    diffusion = GaussianDiffusion(args.timesteps, args.schedule, args.loss, prediction=args.prediction,
                                  learn_sigma=args.learn_sigma, min_snr_gamma=args.min_snr_gamma).to(device)
    timestep_sampler = TimestepSampler(args.timesteps, args.timestep_sampler)
    dataset = load_dataset(args)
    class_names = list(dataset.class_names) if len(dataset.class_names) > 1 else []
    if args.task == "classifier" and not class_names:
        raise UsageError(f"--task classifier: the data has no classes; put the images in one subfolder per class")
    if args.task in ("super_resolution", "image_to_image"):
        class_names = []  # these models are conditioned on an image, not on a label
    hflip = args.hflip == "on" or (args.hflip == "auto" and args.dataset not in ("mnist", "fashion_mnist"))
    if len(dataset) < args.batch_size:
        print(f"note: the dataset has only {len(dataset)} images; --batch_size lowered from {args.batch_size}")
        args.batch_size = len(dataset)

    network = dict(image_size=args.image_size, in_channels=dataset.channels, base_channels=args.base_channels,
                   channel_mults=args.channel_mults, num_res_blocks=args.num_res_blocks,
                   attention_resolutions=args.attention_resolutions, dropout=args.dropout,
                   num_classes=len(class_names))
    if args.task == "classifier":
        resolve_config, build = resolve_classifier_config, build_classifier
    else:
        resolve_config, build = resolve_model_config, build_model
        network.update(out_channels=dataset.channels * (2 if args.learn_sigma else 1),  # learned variances: 2C
                       cond_channels={"super_resolution": dataset.channels, "diffusion": 0}.get(
                           args.task, getattr(dataset, "input_channels", 0)),
                       cond_augment=args.task == "super_resolution" and args.aug_max_t > 0)
    model_config = resolve_config(**network)
    model = build(model_config).to(device)
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
        saved_config = resolve_config(**resumed["model_config"])  # with settings added since filled in
        if saved_config != model_config:  # e.g. a class folder was added since
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
    config["attention_resolutions"] = model_config["attention_resolutions"]  # the resolved default, not None
    config["conditioning"] = conditioning_settings(args)
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
        """One micro-batch -> (mean loss, t [B]), for whichever --task."""
        images, labels = batch  # labels: class indices; for image_to_image, the paired input images
        x0 = to_model_range(images.to(device, non_blocking=True))           # uint8 -> [-1, 1]
        cond = to_model_range(labels.to(device)) if args.task == "image_to_image" else None
        if hflip:  # flip a random half of the batch, each image on its own coin (a pair flips together)
            flip = torch.rand(x0.shape[0], device=device)[:, None, None, None] < 0.5
            x0 = torch.where(flip, x0.flip(-1), x0)
            cond = torch.where(flip, cond.flip(-1), cond) if cond is not None else None

        if args.task == "classifier":  # a classifier of x_t ~ q(x_t | x_0) at uniform t (ADM Sec. 4)
            t = torch.randint(0, args.timesteps, (x0.shape[0],), device=device)
            xt = diffusion.q_sample(x0, t, torch.randn_like(x0))            # DDPM eq. 4
            with autocast:
                logits = model(xt, t)
            return F.cross_entropy(logits.float(), labels.to(device)), t    # -log p_phi(y | x_t)

        y, network = None, model
        if class_names:  # CFG Algorithm 1: each label dropped to "no label" (index K) with prob p_uncond
            y = drop_labels(labels.to(device), args.p_uncond, len(class_names))
        if args.task == "super_resolution":  # SR3 input, with Cascaded Diffusion's conditioning augmentation
            cond = cascade.low_res_condition(x0, args.low_res)
            cond_t = None
            if args.aug_max_t > 0:
                cond_t = cascade.random_augmentation_levels(x0.shape[0], args.aug_max_t, device)
                cond = cascade.augment_condition(diffusion, cond, cond_t)
            network = cascade.conditioned(model, cond, cond_t)
        elif cond is not None:
            network = cascade.conditioned(model, cond)
        t, weights = timestep_sampler.sample(x0.shape[0], device)           # Alg. 1 line 3 (weights 1 if uniform)
        with autocast:
            if args.loss in VLB_LOSSES:
                losses, t = improved_ddpm.training_loss(diffusion, network, x0, y, t)   # IDDPM eq. 16 / L_vlb
            else:
                losses, t = diffusion.training_loss(network, x0, y, t)      # Algorithm 1
        timestep_sampler.update(t, losses)
        return (losses.float() * weights).mean(), t

    # Fixed noise (and labels, or conditioning images) for every sample grid, so grids over training
    # are comparable.
    generator = torch.Generator().manual_seed(args.seed)
    fixed_noise = torch.randn(args.num_samples, dataset.channels, args.image_size, args.image_size,
                              generator=generator).to(device)
    fixed_labels = (torch.arange(args.num_samples, device=device) % len(class_names)) if class_names else None
    fixed_pairs = None
    if args.task != "diffusion":  # a fixed set of real images: conditioning inputs and targets
        picks = torch.randperm(len(dataset), generator=generator)[:args.num_samples].tolist()
        fixed_pairs = [torch.stack(items) if isinstance(items[0], torch.Tensor) else torch.tensor(items)
                       for items in zip(*(dataset[i] for i in picks))]
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

    grid_diffusion = diffusion  # what draws the grids: Algorithm 2 over all T steps, or respaced (eq. 19)
    if args.sample_steps and args.sample_steps < args.timesteps:
        grid_diffusion = improved_ddpm.respace(diffusion, args.sample_steps)

    def sample_grid():
        """A grid from the EMA model; for image-conditioned models, rows of input, sample, target; for a
        classifier, its accuracy on the fixed images noised to a few levels t."""
        path = os.path.join(run_sample_dir, f"step_{step:07d}.png")
        if args.task == "classifier":
            images, labels = fixed_pairs
            x0 = to_model_range(images.to(device))
            accuracy = []
            for t_value in (0, args.timesteps // 4, args.timesteps // 2, 3 * args.timesteps // 4):
                t = torch.full((len(x0),), t_value, device=device, dtype=torch.long)
                with torch.no_grad():
                    predicted = ema_model(diffusion.q_sample(x0, t, torch.randn_like(x0)), t).argmax(1).cpu()
                accuracy.append(f"t={t_value}: {(predicted == labels).float().mean().item():.0%}")
            return "accuracy on noisy images, " + ", ".join(accuracy)
        if args.task == "diffusion":
            images = grid_diffusion.sample(ema_model, fixed_noise.shape, fixed_labels, noise=fixed_noise, progress=False)
            save_grid(from_model_range(images), path)
            return f"samples in {path}"
        targets, inputs = fixed_pairs
        x0 = to_model_range(targets.to(device))
        if args.task == "super_resolution":
            low = cascade.downsample(x0, args.low_res)
            cond, cond_t = cascade.sr_condition(diffusion, low, args.image_size,
                                                cascade.sampling_level(config["conditioning"]))
            shown = cascade.upsample(low, args.image_size)  # the input, without its augmentation noise
        else:
            cond, cond_t = to_model_range(inputs.to(device)), None
            shown = cond if cond.shape[1] == x0.shape[1] else cond.mean(1, keepdim=True).expand_as(x0)
        images = grid_diffusion.sample(cascade.conditioned(ema_model, cond, cond_t), fixed_noise.shape,
                                       noise=fixed_noise, progress=False)
        save_grid(from_model_range(torch.cat([shown, images, x0])), path, nrow=len(x0))
        return f"input / sample / target rows in {path}"

    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    # Ctrl-C too, explicitly: a process started in the background by a script (nohup ... &) inherits
    # SIGINT as ignored, and Python then installs no KeyboardInterrupt handler, so `kill -INT` would do
    # nothing and the save-on-interrupt promise would silently break.
    signal.signal(signal.SIGINT, stop_like_ctrl_c)
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
                bar.write(f"step {step}: {sample_grid()}")
    except KeyboardInterrupt:
        bar.close()
        flush_log()
        save()
        print(f"\ninterrupted at step {step}: saved {full_path} and {ema_path}; continue with --resume")
        sys.exit(130)
    bar.close()
    flush_log()
    use = {"diffusion": f"python sample.py --ckpt {ema_path}",
           "classifier": f"python sample.py --ckpt <a diffusion model's _ema.pt> --classifier_ckpt {ema_path}",
           "super_resolution": f"python sample.py --ckpt <base _ema.pt> --sr_ckpt {ema_path}, or "
                               f"--ckpt {ema_path} --cond_images <low-res images>",
           "image_to_image": f"python sample.py --ckpt {ema_path} --cond_images <input images>"}[args.task]
    print(f"done at step {step}: {full_path} (to resume) and {ema_path} (to use: {use})")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
