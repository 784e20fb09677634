"""
train.py: train a DDPM on a folder of your images (or a built-in dataset) and write checkpoints.

    python train.py                                   # the offline built-in 'shapes' dataset
    python train.py --dataset_path data/cars          # your folder; class subfolders become labels
    python train.py --dataset_path data/cars --resume # continue from checkpoints/cars.pt
    python train.py --dataset_path data/cars --max_minutes 20 --amp   # a 20-minute budget, bf16 if it pays
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
Checkpoints are written atomically every --save_every steps, at the end, and on Ctrl-C or SIGTERM;
--keep_last N keeps the N newest as step-numbered files. A resumed run continues exactly where the
stopped one was (the same data order, random numbers, learning rate and EMA), bit for bit on CPU.

Scaling up (README, "Scaling up"; the machinery is in scaling.py): `torchrun --nproc_per_node N
train.py ...` trains on N processes with DistributedDataParallel (--batch_size is per process);
--grad_checkpointing, --channels_last,
--compile and --amp trade compute or precision for memory and speed; --swa_start keeps a stochastic
weight average beside the EMA; --tensorboard logs to TensorBoard as well as loss.csv.

--task picks what is trained (cascade.py, guidance.py): 'diffusion' (the default; class subfolders make
it class-conditional, with classifier-free guidance's label dropout --p_uncond), 'classifier' (a
classifier of noisy images for classifier guidance), 'super_resolution' (a diffusion model conditioned on
a --low_res copy of each image, with conditioning augmentation) or 'image_to_image' (conditioned on a
paired input image from --cond_path).

--t_min / --t_max train an expert denoiser on one interval of t (eDiff-I, experts.py), and
--init_from starts a run from another checkpoint's EMA weights (fine-tuning).
"""
import argparse
import contextlib
import copy
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import cascade
import improved_ddpm
import cold
from cascade import TASKS
from cold import COLD_LOSSES, DEGRADATIONS, ColdDiffusion
from ddpm import LOSSES, PREDICTIONS, SCHEDULES, VLB_LOSSES, GaussianDiffusion
from guidance import classifier_training_loss, drop_labels, noisy_accuracy
from improved_ddpm import TIMESTEP_SAMPLERS, TimestepSampler
from model import (build_classifier, build_model, check_network_settings, count_parameters,
                   resolve_classifier_config, resolve_model_config)
from scaling import (ResumableSampler, SharedRandomness, StopSignals, TrainingLog, compile_or_fallback,
                     endless_batches, forked_rng, quiet_worker_signals, restore_rng_states, rng_states, setup_distributed,
                     shut_down_workers, step_statistics, weights_are_finite, write_checkpoints)
from utils import (HelpFormatter, ImageFolderDataset, PairedImageDataset, UsageError, check_output_folder,
                   emulated_bf16_note, from_model_range, keep_freed_memory, load_builtin_dataset, load_checkpoint,
                   load_npz_dataset, load_weights, out_of_memory, peak_memory_mb, plain_class_names,
                   remove_stale_temporaries, reorder_classes, reset_peak_memory, resolve_amp, resolve_channels_last,
                   run_files, save_grid, seed_everything, to_model_range, typed_flags)

BUILTIN_DATASETS = ("shapes", "mnist", "fashion_mnist", "cifar10")
# Default run names: the dataset's name, plus this, so a folder's base, SR and classifier runs coexist.
RUN_SUFFIX = dict(diffusion="", classifier="_classifier", super_resolution="_sr", image_to_image="_i2i")
# Flags that only steer this run (where to write, how long, on what device): on --resume these come
# from the command line; every other setting comes from the checkpoint, so the run continues unchanged.
# The memory and speed switches are among them: they change how a step is computed, not what it computes,
# so a run may resume on other hardware with other switches.
RUN_CONTROL_FLAGS = ("max_steps", "max_minutes", "save_every", "sample_every", "num_samples", "sample_steps", "device",
                     "num_workers", "checkpoint_dir", "sample_dir", "resume", "keep_last", "tensorboard",
                     "grad_checkpointing", "channels_last", "compile")
# On --resume a typed data path is read instead of the saved one (the folder may have moved since).
DATA_PATH_FLAGS = ("dataset_path", "cond_path")
# A non-finite loss or gradient skips the step (fp16 loss scaling overflows now and then); this many in
# a row means the run has diverged, and it stops.
MAX_SKIPPED_STEPS = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a DDPM (Ho et al. 2020) on a folder of images.",
                                formatter_class=HelpFormatter)
    p.add_argument("--task", default="diffusion", choices=TASKS,
                   help="what to train: a diffusion model; a noisy-image classifier for classifier guidance; "
                   "a super-resolution model; an image-to-image model (cascade.py)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset_path", default=None, help="folder of images (images in class subfolders "
                      "become labels, images directly inside mean unconditional), or an MNIST-style .npz file "
                      "with x_train and y_train arrays")
    data.add_argument("--dataset", default=None, choices=BUILTIN_DATASETS, help="built-in dataset when no "
                      "--dataset_path: 'shapes' is generated offline; the others download via torchvision")
    data.add_argument("--image_size", type=int, default=32, help="images are resized and centre-cropped to this")
    data.add_argument("--channels", type=int, default=None, choices=(1, 3),
                      help="1 = grayscale, 3 = RGB; default: 3 if any image in the folder has colour")
    data.add_argument("--hflip", default="auto", choices=("auto", "on", "off"),
                      help="random horizontal flips; auto = on except for digits and letters (data or its folder named "
                           "like mnist, svhn, usps, digit, letter, glyph, font)")
    data.add_argument("--num_workers", type=int, default=None,
                      help="data-loading processes; default 0 on CPU (the model needs both cores), 4 on GPU")

    diffusion = p.add_argument_group("diffusion (ddpm.py; Improved DDPM options: improved_ddpm.py)")
    diffusion.add_argument("--process", default="gaussian", choices=("gaussian", "cold"),
                           help="gaussian: DDPM's noise (ddpm.py); cold: a deterministic --degradation "
                           "(Cold Diffusion, cold.py)")
    diffusion.add_argument("--degradation", default="blur", choices=DEGRADATIONS,
                           help="--process cold: what destroys the image (blur, pixelate, mask, fade)")
    diffusion.add_argument("--timesteps", type=int, default=None,
                           help="T, the number of diffusion steps (default 1000; 50 levels for --process cold)")
    diffusion.add_argument("--schedule", default="linear", choices=SCHEDULES,
                           help="beta schedule: linear (DDPM) or cosine (Improved DDPM eq. 17)")
    diffusion.add_argument("--loss", default=None, choices=LOSSES,
                           help="l2 (the default) is L_simple (eq. 14); l1, huber swap the distance; vlb_l2 weighs "
                           "it per t as eq. 12; hybrid = L_simple + 0.001 L_vlb (Improved DDPM eq. 16, needs "
                           "--learn_sigma); kl = L_vlb alone. --process cold: l1 (the default) or l2")
    diffusion.add_argument("--prediction", default="eps", choices=PREDICTIONS,
                           help="what the network predicts: the noise eps (DDPM), the image x0, or v "
                           "(Salimans & Ho 2022)")
    diffusion.add_argument("--learn_sigma", action="store_true",
                           help="the network also outputs the reverse variances (Improved DDPM eq. 15); "
                           "better with few sampling steps; use with --loss hybrid")
    diffusion.add_argument("--min_snr_gamma", type=float, default=0.0,
                           help="Min-SNR-gamma loss weighting (Hang et al. 2023); 5 is the paper's; 0 = off")
    diffusion.add_argument("--t_min", type=int, default=None,
                           help="train an expert denoiser (eDiff-I, experts.py) on t = --t_min .. --t_max only "
                           "(code t, 0 .. T-1); default: every t")
    diffusion.add_argument("--t_max", type=int, default=None, help="the expert's last t (see --t_min)")
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
                          "default T/50 (at most --aug_max_t)")
    guidance.add_argument("--cond_path", default=None,
                          help="image_to_image: folder of input images, named like their targets in --dataset_path")

    model = p.add_argument_group("model (model.py)")
    model.add_argument("--base_channels", type=int, default=32, help="UNet channels at full resolution")
    model.add_argument("--channel_mults", type=int, nargs="+", default=[1, 2, 2],
                       help="channel multiplier per UNet level; each extra level halves the resolution")
    model.add_argument("--num_res_blocks", type=int, default=2, help="residual blocks per level")
    model.add_argument("--attention_resolutions", type=int, nargs="*", default=None,
                       help="feature-map sizes that get self-attention (none: only the middle block); "
                            "default: 8x8 and below, else the lowest level if it is 16x16 or smaller")
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
    train.add_argument("--max_minutes", type=float, default=None,
                       help="also stop (and save) after this many minutes of training, and let the learning-rate "
                            "cosine follow whichever of steps and minutes runs out first (README: Speed)")
    train.add_argument("--ema_decay", type=float, default=0.999,
                       help="EMA decay; the decay used warms up as min(this, (1 + step) / (10 + step)), reaching 0.999 "
                            "near step 9000; 0.9999 as in DDPM suits runs of 100k+ steps")
    train.add_argument("--amp", nargs="?", const="auto", default="off", choices=("off", "auto", "bf16", "fp16"),
                       help="mixed precision (autocast; weights, EMA and optimizer state stay fp32): bf16, or fp16 "
                       "with loss scaling (CUDA only); --amp alone = auto: on CUDA bf16 where supported, else fp16; on a "
                       "CPU bf16 if it has AMX or AVX-512 BF16 (2-3x faster there), else fp32")
    train.add_argument("--swa_start", type=int, default=None,
                       help="keep a stochastic weight average (Izmailov et al. 2018; torch.optim.swa_utils) of the "
                       "weights after every step from this one on, beside the EMA; sample it with sample.py "
                       "--weights swa")
    train.add_argument("--init_from", default=None,
                       help="start from this checkpoint's EMA weights instead of random ones (fine-tuning, e.g. "
                       "eDiff-I experts from a model trained on every t); its model and diffusion must match")
    train.add_argument("--seed", type=int, default=0, help="seed for weights, data order, noise")
    train.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps; "
                       "under torchrun each process takes the GPU of its LOCAL_RANK")

    scale = p.add_argument_group("memory and speed (README: Scaling up)")
    scale.add_argument("--grad_checkpointing", action="store_true",
                       help="recompute each block's activations in the backward pass instead of storing them: "
                       "less memory, about a third more compute")
    scale.add_argument("--channels_last", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                       help="NHWC memory layout for the network and its inputs; auto: on for fp32 on a CPU (faster "
                       "convolutions there), off with --amp and on GPUs; --channels_last alone = on")
    scale.add_argument("--compile", action="store_true",
                       help="torch.compile the network (a slow first step, faster ones after); falls back with a "
                       "note where this platform cannot compile")

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
    out.add_argument("--keep_last", type=int, default=0,
                     help="also keep the N newest checkpoints as <run>_stepNNNNNNN.pt (and _ema_); <run>.pt and "
                     "<run>_ema.pt always name the newest; 0 = only those two")
    out.add_argument("--tensorboard", action="store_true",
                     help="also log to TensorBoard (<sample_dir>/<run>/tensorboard; needs pip install tensorboard)")
    out.add_argument("--resume", action="store_true", help="continue from <checkpoint_dir>/<run>.pt")
    out.add_argument("--overwrite", action="store_true",
                     help="start afresh even though <checkpoint_dir>/<run>.pt exists: that run's checkpoints (the "
                     "--keep_last ones too) are deleted and its loss log restarted (without it such a run is refused)")
    return p.parse_args(argv), typed_flags(p, argv)


def resolve_process_defaults(args):
    """Defaults that depend on --process: T = 1000 and L_simple for Gaussian diffusion; T = 50 levels and
    the l1 restoration loss (the Cold Diffusion authors' default) for --process cold."""
    cold = args.process == "cold"
    args.timesteps = args.timesteps if args.timesteps is not None else (50 if cold else 1000)
    args.loss = args.loss if args.loss is not None else ("l1" if cold else "l2")


def check_args(args):
    """Catch bad settings before any work is done, each with the flag's name."""
    for name, value in vars(args).items():  # nan passes every < and > test below, and inf trains to NaN
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name} {value}: must be a finite number")
    positive = ("image_size", "timesteps", "batch_size", "accumulation_iters", "max_steps", "base_channels",
                "num_res_blocks", "save_every", "num_samples")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.sample_every < 0:
        raise UsageError(f"--sample_every {args.sample_every}: must be 0 (no grids) or more")
    if not 0 <= args.seed < 2**32:  # numpy's seeds
        raise UsageError(f"--seed {args.seed}: must be in 0 .. 2^32 - 1")
    if args.dataset_path is not None and not args.dataset_path.strip():  # an unset $DATA, say
        raise UsageError("--dataset_path is empty; name a folder of images (or leave the flag out for the "
                         "built-in shapes)")
    if args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be positive")
    if args.grad_clip <= 0:  # clip_grad_norm_ would scale every gradient to 0 (or flip it, below 0)
        raise UsageError(f"--grad_clip {args.grad_clip}: must be positive (DDPM used 1; a large value clips rarely)")
    for name in ("warmup_steps", "weight_decay"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} {getattr(args, name)}: must be 0 or more")
    if args.num_workers is not None and args.num_workers < 0:
        raise UsageError(f"--num_workers {args.num_workers}: must be 0 (load in the main process) or more")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UsageError(f"--max_minutes {args.max_minutes}: must be positive (leave it out to stop by --max_steps only)")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UsageError(f"--ema_decay {args.ema_decay}: must be in [0, 1)")
    if args.sample_steps is not None and not 1 <= args.sample_steps <= args.timesteps:
        raise UsageError(f"--sample_steps {args.sample_steps}: must be between 1 and --timesteps {args.timesteps}")
    if args.swa_start is not None and not 0 <= args.swa_start < args.max_steps:
        raise UsageError(f"--swa_start {args.swa_start}: must be a step in 0 .. --max_steps {args.max_steps} - 1")
    if args.keep_last < 0:
        raise UsageError(f"--keep_last {args.keep_last}: must be 0 (only <run>.pt) or more")
    if not 0.0 <= args.p_uncond < 1.0:
        raise UsageError(f"--p_uncond {args.p_uncond}: must be in [0, 1) (0.1 is the usual; 1 would never use the labels)")
    # The network's shape flags, before the data is read. On --resume they are the saved run's, built before.
    check_network_settings(args.image_size, args.channel_mults, None if args.resume else args.attention_resolutions)
    if args.dataset_path and args.dataset:
        raise UsageError("give either --dataset_path (your folder) or --dataset (a built-in), not both")
    if args.process == "cold":
        gaussian_only = [flag for flag, used in (
            ("--task " + args.task, args.task != "diffusion"), ("--learn_sigma", args.learn_sigma),
            ("--prediction " + args.prediction, args.prediction != "eps"), ("--min_snr_gamma", args.min_snr_gamma),
            ("--timestep_sampler " + args.timestep_sampler, args.timestep_sampler != "uniform"),
            ("--t_min/--t_max", args.t_min is not None or args.t_max is not None),
            ("--init_from", args.init_from is not None), ("--sample_steps", args.sample_steps is not None)) if used]
        if gaussian_only:
            raise UsageError(f"--process cold: {gaussian_only[0]} belongs to Gaussian diffusion; a Cold Diffusion "
                             "model restores x_0 from every level (cold.py)")
        if args.loss not in COLD_LOSSES:
            raise UsageError(f"--process cold --loss {args.loss}: the restoration loss is l1 or l2")
    if args.task == "classifier" and (args.t_min is not None or args.t_max is not None):
        raise UsageError("--t_min/--t_max train an expert denoiser (experts.py); a --task classifier sees every t")
    if args.task == "classifier":  # its loss is cross-entropy at uniform t (guidance.classifier_training_loss)
        denoiser_only = [flag for flag, used in (
            ("--loss " + str(args.loss), args.loss not in (None, "l2")),
            ("--prediction " + args.prediction, args.prediction != "eps"), ("--learn_sigma", args.learn_sigma),
            ("--min_snr_gamma", bool(args.min_snr_gamma)),
            ("--timestep_sampler " + args.timestep_sampler, args.timestep_sampler != "uniform")) if used]
        if denoiser_only and not args.resume:
            raise UsageError(f"--task classifier: {denoiser_only[0]} shapes a denoiser's loss; the classifier is trained "
                             "with cross-entropy at uniform t, so leave it out")
    if args.loss == "kl" and args.min_snr_gamma and not args.resume:
        raise UsageError("--loss kl --min_snr_gamma: L_vlb keeps the bound's own weights per t and ignores Min-SNR; "
                         "use --loss hybrid (its L_simple part is weighted) or leave out --min_snr_gamma")
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


def expert_t_range(args):
    """The interval of t this run trains on, (t_min, t_max) inclusive: all of 0 .. T-1 unless --t_min or
    --t_max make it an expert denoiser (eDiff-I, experts.py)."""
    return (args.t_min if args.t_min is not None else 0,
            args.t_max if args.t_max is not None else args.timesteps - 1)


def init_weights_from(model, path, model_config, diffusion_config, task="diffusion"):
    """--init_from: copy a checkpoint's EMA weights into model, after checking that its network and its
    diffusion are this run's (a fine-tuned expert must speak the same t and predict the same thing)."""
    state = load_checkpoint(path, required=("model_config", "diffusion_config", "ema"), flag="--init_from")
    if state.get("task", "diffusion") != task:  # another kind of network: say so, not which weight is missing
        raise UsageError(f"--init_from {path}: a --task {state.get('task', 'diffusion')} checkpoint; this run trains "
                         f"--task {task}, so start from a checkpoint of that task")
    saved = resolve_model_config(**state["model_config"])
    differ = [k for k in model_config if saved.get(k) != model_config[k]]
    for key in ("timesteps", "schedule", "prediction", "learn_sigma"):
        if state["diffusion_config"].get(key) != diffusion_config[key]:
            differ.append(key)
    if differ:
        key = differ[0]
        mine = model_config.get(key, diffusion_config.get(key))
        theirs = saved.get(key, state["diffusion_config"].get(key))
        raise UsageError(f"--init_from {path}: it has {key} = {theirs}, this run {mine}; pass the same model and "
                         "diffusion flags it was trained with")
    load_weights(model, state["ema"], path, "--init_from")
    return state.get("step")


def network_settings(args, dataset, class_names):
    """The network's settings (model.py) for this task and data, before model.py fills in its defaults:
    a diffusion model outputs C channels (2C with learned variances) and takes conditioning images as
    extra input channels; a noisy classifier (--task classifier) outputs one logit per class."""
    settings = dict(image_size=args.image_size, in_channels=dataset.channels, base_channels=args.base_channels,
                    channel_mults=args.channel_mults, num_res_blocks=args.num_res_blocks,
                    attention_resolutions=args.attention_resolutions, dropout=args.dropout,
                    num_classes=len(class_names))
    if args.task != "classifier":
        settings.update(out_channels=dataset.channels * (2 if args.learn_sigma else 1),  # learned variances: 2C
                        cond_channels={"super_resolution": dataset.channels, "diffusion": 0}.get(
                            args.task, getattr(dataset, "input_channels", 0)),
                        cond_augment=args.task == "super_resolution" and args.aug_max_t > 0)
    return settings


def load_dataset(args):
    if args.task == "image_to_image":
        return PairedImageDataset(args.dataset_path, args.cond_path, args.image_size, args.channels)
    if args.dataset_path and args.dataset_path.endswith(".npz"):  # MNIST-style arrays, x_train / y_train
        return load_npz_dataset(args.dataset_path, args.image_size, args.channels)
    if args.dataset_path:
        return ImageFolderDataset(args.dataset_path, args.image_size, args.channels, reads_npz=True)
    dataset = load_builtin_dataset(args.dataset or "shapes", args.image_size)
    if args.channels and args.channels != dataset.channels:
        raise UsageError(f"--channels {args.channels}: the {args.dataset} dataset has {dataset.channels}")
    return dataset



# ---------------------------------------------------------------------------------------------
# The training aids around Algorithm 1
# ---------------------------------------------------------------------------------------------

def lr_lambda(step, warmup_steps, max_steps, time_used=0.0):
    """Learning-rate factor: linear warm-up to 1 over warmup_steps, then half a cosine down to 0. With a
    time budget (--max_minutes), time_used is the fraction of it spent, and the cosine follows whichever
    of steps and time is further along, so a run cut short by the clock still ends at a low rate. The
    warm-up is capped by the time cosine too: a budget that runs out during warm-up ends low, and the
    factor does not jump down when warm-up ends late in the budget (time_used is 0 without a budget)."""
    by_time = 0.5 * (1.0 + math.cos(math.pi * min(1.0, time_used)))
    if step < warmup_steps:
        return min((step + 1) / warmup_steps, by_time)
    progress = max((step - warmup_steps) / max(1, max_steps - warmup_steps), time_used)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def update_ema(ema_model, model, decay, step):
    """ema <- decay * ema + (1 - decay) * weights, with a warm-up so early, random weights are
    forgotten quickly: the decay actually used is min(decay, (1 + step) / (10 + step)). Every
    process holds the same weights after each step, so every process's EMA is the same too."""
    decay = min(decay, (1 + step) / (10 + step))
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def accumulate_gradients(loss_fn, micro_batches, scaler, no_sync=contextlib.nullcontext):
    """Backpropagate k micro-batches so that the summed gradient equals the gradient of one batch
    k times larger: each micro-batch's mean loss is divided by k before backward(). With
    DistributedDataParallel, backward() also averages the gradient over processes; no_sync skips
    that on all but the last micro-batch, whose backward() then averages the sum once.
    loss_fn(batch) -> (per-image losses [B], t [B]). Returns (losses [k*B] detached, t [k*B])."""
    k, all_losses, all_t = len(micro_batches), [], []
    for i, batch in enumerate(micro_batches):
        with no_sync() if i < k - 1 else contextlib.nullcontext():
            losses, t = loss_fn(batch)
            scaler.scale(losses.mean() / k).backward()
        all_losses.append(losses.detach())
        all_t.append(t)
    return torch.cat(all_losses), torch.cat(all_t)


def conditioning_settings(args):
    """What sample.py needs to feed an image-conditioned model, as a plain dict ({} for the others)."""
    if args.task == "super_resolution":
        return dict(low_res=args.low_res, aug_max_t=args.aug_max_t, sample_aug_t=args.sample_aug_t)
    return {}


def checkpoint_states(step, model, ema_model, swa_model, optimizer, scheduler, scaler, config, model_config,
                      diffusion_config, class_names, timestep_sampler, rng, train_seconds=0.0):
    """The two checkpoint dicts, all plain Python types and tensors (loadable with weights_only=True).
    task says what the network is (cascade.TASKS); conditioning holds a super-resolution model's
    low_res and augmentation levels; p_uncond tells sample.py whether the "no label" input was trained
    (classifier-free guidance). swa (with swa_count, the number of weights averaged) appears once
    --swa_start is reached; rng holds every random stream, so that a resumed run is exact; train_seconds
    is the time spent in training steps so far (not grids or saving), over every resumed part
    (tools/time_to_quality.py)."""
    task = config["task"]
    # A Cold Diffusion model stores its degradation under cold_config, so that the tools made for Gaussian
    # diffusion, which read diffusion_config, refuse it with a clear message (utils.load_checkpoint).
    process = {"cold_config": diffusion_config, "process": "cold"} if config["process"] == "cold" else {
        "diffusion_config": diffusion_config}
    describes_itself = dict(task=task, model_config=model_config, **process,
                            class_names=class_names, step=step, conditioning=config["conditioning"],
                            p_uncond=config["p_uncond"] if class_names and task == "diffusion" else 0.0,
                            t_range=config["t_range"], train_seconds=float(train_seconds))
    averaged = {}
    if swa_model is not None and swa_model.n_averaged.item() > 0:
        averaged = dict(swa=swa_model.module.state_dict(), swa_count=int(swa_model.n_averaged.item()))
    ema_state = dict(kind="ema", ema=ema_model.state_dict(), **averaged, **describes_itself)
    full_state = dict(kind="full", model=model.state_dict(), ema=ema_model.state_dict(), **averaged,
                      optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                      scaler=scaler.state_dict(), config=config, timestep_sampler=timestep_sampler.state_dict(),
                      rng=rng, **describes_itself)
    return full_state, ema_state


def restore_training_state(resumed, path, saved_config, model_config, model, ema_model, swa_model, optimizer,
                           scheduler, scaler, timestep_sampler):
    """--resume: load every piece of a stopped run's state from its full checkpoint (strict key matching,
    utils.load_weights): the weights, the EMA, the SWA average once it has begun, AdamW's moments, the
    learning-rate schedule, the fp16 loss scale and the loss-aware t sampler's history. First, the
    network the saved run trained (saved_config) must be the one this run's data builds (model_config)."""
    if saved_config != model_config:  # e.g. a class folder was added since
        changed = [k for k in model_config if saved_config.get(k) != model_config[k]]
        was = ", ".join(f"{k}={saved_config.get(k)}" for k in changed)
        now = ", ".join(f"{k}={model_config[k]}" for k in changed)
        raise UsageError(f"--resume: {path} was trained with {was}, but the data now gives {now}; "
                         "restore the dataset or start a new --run_name")
    load_weights(model, resumed["model"], path, "--resume:")
    load_weights(ema_model, resumed["ema"], path, "--resume:")
    if swa_model is not None and "swa" in resumed:
        load_weights(swa_model.module, resumed["swa"], path, "--resume:")
        swa_model.n_averaged.fill_(resumed["swa_count"])
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    scaler.load_state_dict(resumed["scaler"])
    if "timestep_sampler" in resumed:
        timestep_sampler.load_state_dict(resumed["timestep_sampler"])


# ---------------------------------------------------------------------------------------------
# Sample grids: watching a run learn
# ---------------------------------------------------------------------------------------------

def fixed_grid_inputs(args, dataset, diffusion, class_names, device):
    """What every grid of the run starts from, drawn once so that grids over training are comparable:
    x_T noise [N x C x S x S] and labels [N] (one class after another); for image-conditioned models and
    classifiers, N real (image, label-or-input) pairs; for Cold Diffusion, fixed starts (channel means from
    the mixture, or for a degradation that cannot generate, real images degraded to level T/2)."""
    generator = torch.Generator().manual_seed(args.seed)
    fixed = dict(noise=torch.randn(args.num_samples, dataset.channels, args.image_size, args.image_size,
                                   generator=generator).to(device),
                 labels=(torch.arange(args.num_samples, device=device) % len(class_names)) if class_names else None)
    if args.task != "diffusion":  # a fixed set of real images: conditioning inputs and targets
        picks = torch.randperm(len(dataset), generator=generator)[:args.num_samples].tolist()
        fixed["pairs"] = [torch.stack(items) if isinstance(items[0], torch.Tensor) else torch.tensor(items)
                          for items in zip(*(dataset[i] for i in picks))]
        fixed["noise"] = fixed["noise"][:len(picks)]  # a folder smaller than --num_samples: one x_T per pair
    if args.process == "cold" and args.degradation not in cold.GENERATES:  # a mask model cannot generate
        real = to_model_range(torch.stack([dataset[i][0] for i in range(min(args.num_samples, len(dataset)))]))
        half = torch.full((len(real),), args.timesteps // 2, dtype=torch.long)
        fixed.update(real=real.to(device), start=diffusion.degrade(real.to(device), half.to(device)))
    elif args.process == "cold":
        fixed["start"] = diffusion.start_images(args.num_samples, dataset.channels,
                                                torch.Generator().manual_seed(args.seed), device)
    return fixed


def sample_grid(args, ema_model, diffusion, grid_diffusion, fixed, path):
    """One grid from the EMA model, saved to path: samples; for image-conditioned models, rows of input,
    sample, target; for Cold Diffusion that restores, rows of degraded, restored, original; for a
    classifier, no picture but its accuracy on the fixed images noised to a few levels t.
    Returns (message, path or None)."""
    device = fixed["noise"].device
    if args.task == "classifier":
        images, labels = fixed["pairs"]
        levels = (0, args.timesteps // 4, args.timesteps // 2, 3 * args.timesteps // 4)
        accuracy = noisy_accuracy(ema_model, diffusion, to_model_range(images.to(device)), labels, levels)
        return "accuracy on noisy images, " + ", ".join(f"t={t}: {a:.0%}" for t, a in accuracy.items()), None
    if args.process == "cold":  # Algorithm 2 from the fixed starts (all T levels, or T/2 when restoring)
        start, restoring = fixed["start"], "real" in fixed
        labels = fixed["labels"][:len(start)] if fixed["labels"] is not None else None
        images = diffusion.sample(ema_model, start, labels, steps=args.timesteps // 2 if restoring else None,
                                  progress=False)
        if restoring:
            save_grid(from_model_range(torch.cat([start, images, fixed["real"]])), path, nrow=len(start))
            return f"degraded / restored / original rows in {path}", path
        save_grid(from_model_range(images), path)
        return f"samples in {path}", path
    noise = fixed["noise"]
    if args.task == "diffusion":
        images = grid_diffusion.sample(ema_model, noise.shape, fixed["labels"], noise=noise, progress=False)
        save_grid(from_model_range(images), path)
        return f"samples in {path}", path
    targets, inputs = fixed["pairs"]
    x0 = to_model_range(targets.to(device))
    if args.task == "super_resolution":
        low = cascade.downsample(x0, args.low_res)
        cond, cond_t = cascade.sr_condition(diffusion, low, args.image_size,
                                            cascade.sampling_level(conditioning_settings(args)))
        shown = cascade.upsample(low, args.image_size)  # the input, without its augmentation noise
    else:
        cond, cond_t = to_model_range(inputs.to(device)), None
        shown = cond if cond.shape[1] == x0.shape[1] else cond.mean(1, keepdim=True).expand_as(x0)
    images = grid_diffusion.sample(cascade.conditioned(ema_model, cond, cond_t), noise.shape, noise=noise,
                                   progress=False)
    save_grid(from_model_range(torch.cat([shown, images, x0])), path, nrow=len(x0))
    return f"input / sample / target rows in {path}", path


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def check_run_name(run_name, given):
    """A run's files are <run>.pt, <run>_ema.pt and <run>_step<N>.pt side by side in --checkpoint_dir, and
    its grids go to <sample_dir>/<run>: a name must be one plain file name (a / would put the files in a
    subfolder, out of reach of the check that an earlier run is not replaced), and must not end the way
    another run's files do (a run named foo_ema would overwrite foo's EMA file)."""
    where = "--run_name" if given else "the run name (from the data's name; pass --run_name NAME)"
    if not run_name or run_name.startswith(".") or "/" in run_name or "\\" in run_name:
        raise UsageError(f"{where} {run_name!r}: must be a plain file name, such as cars_64px: no /, no leading dot")
    if re.search(r"_(ema|step\d+)$", run_name):
        raise UsageError(f"{where} {run_name!r}: ends like another run's files (<run>_ema.pt, <run>_step<N>.pt); "
                         "pick a name without that ending")


def check_outputs_outside_data(args):
    """Checkpoints and grids written inside the image folder would be read back as training images (a
    samples/ folder becomes a class, its loss.png an image) the next time the folder is read."""
    if not args.dataset_path or not os.path.isdir(args.dataset_path):
        return
    data = os.path.realpath(args.dataset_path)
    for flag in ("checkpoint_dir", "sample_dir"):
        folder = os.path.realpath(getattr(args, flag))
        if os.path.commonpath([data, folder]) == data:
            raise UsageError(f"--{flag} {getattr(args, flag)}: inside --dataset_path {args.dataset_path}, where its "
                             f"files would be read as training images; run from another folder or pass --{flag} "
                             "outside the data")


def load_resumed_run(args, typed, full_path):
    """--resume: the stopped run's checkpoint, and its settings as this run's args. Run-control flags
    given on this command line (RUN_CONTROL_FLAGS) win, and so do the data's paths (DATA_PATH_FLAGS: the
    folder may have moved); every other setting is the saved run's, so the run continues unchanged.
    typed: the flags given on this command line (parse_args). Returns (args, the checkpoint dict, the other
    flags given that differ from the saved run's, which are ignored, and the data paths that moved; the
    caller says so)."""
    if not os.path.isfile(full_path):
        raise UsageError(f"--resume: no checkpoint {full_path} to resume from; train without --resume first, "
                         "or pass the --run_name / --checkpoint_dir it was saved under")
    resumed = load_checkpoint(full_path, required=("config", "model", "ema", "optimizer", "step"), flag="--resume:")
    saved = resumed["config"]
    # The data may have moved (another folder, or another working directory): a typed --dataset_path or
    # --cond_path is read instead of the saved one, where the run read one; main still checks its classes.
    data_paths = [name for name in DATA_PATH_FLAGS if name in typed and saved.get(name) and getattr(args, name)]
    ignored = [f"--{name} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
               f" (the run's: {saved[name]})" for name, value in vars(args).items()
               if name not in RUN_CONTROL_FLAGS + tuple(data_paths) and name in saved and name in typed
               and value != saved[name]]
    moved = [f"--{name} {getattr(args, name)} (the run read {saved[name]})" for name in data_paths
             if getattr(args, name) != saved[name]]
    for name in RUN_CONTROL_FLAGS + tuple(data_paths):  # typed run-control flags win; the rest is the saved run
        if name in typed and name in saved:
            saved[name] = getattr(args, name)
    args = argparse.Namespace(**{**vars(args), **saved, "resume": True})
    if args.attention_resolutions is None:  # a run saved before configs stored the resolved default,
        args.attention_resolutions = resumed["model_config"]["attention_resolutions"]  # which has changed
    args.amp = {True: "auto", False: "off"}.get(args.amp, args.amp)  # older runs saved --amp as on/off
    return args, resumed, ignored, moved


def resumed_class_names(saved, dataset, class_names, builtin, say):
    """--resume: the run's class names, saved, against the data's, class_names (label i is class_names[i]).
    Label i must keep meaning the class the weights learned as i, so the data is made to number its
    classes the run's way where only the spelling or the order differs (dataset relabelled in place), and
    anything else is refused: a class folder added, removed or renamed would swap labels silently when
    the count stays the same. Returns the class names to train with."""
    if builtin and plain_class_names(saved) == class_names:
        # A built-in dataset's run from before names were made plain ('3 - three', 'T-shirt/top') keeps them.
        dataset.class_names = saved
        return saved
    if sorted(saved) == sorted(class_names) and saved != class_names:
        # The same classes in another order (numbered folders were ordered as text before this version).
        reorder_classes(dataset, saved)
        say("note: the run numbered these classes in another order (an older version sorted numbered folders as "
            "text); it keeps its own order")
        return list(dataset.class_names)
    if saved != class_names:
        differ = next((i for i, pair in enumerate(zip(saved, class_names)) if pair[0] != pair[1]), None)
        raise UsageError("--resume: the data's classes differ from the run's ("
                         + (f"label {differ} is {class_names[differ]!r} now, {saved[differ]!r} saved; "
                            if differ is not None else "")
                         + f"{len(class_names)} classes now, {len(saved)} saved); resume on the same class "
                         "folders, or start a new run")
    return class_names


def dataset_name(args):
    """The data's name: the folder's (or .npz file's) name ("." too: the folder it stands for), or the
    built-in dataset's."""
    if args.dataset_path:
        return os.path.basename(os.path.abspath(args.dataset_path)).removesuffix(".npz")
    return args.dataset or "shapes"


# Words in a dataset's name (or its folder's) that mean digits or letters, where a mirror image is another
# symbol: --hflip auto leaves flips off for them, and for any word ending in mnist (emnist, kmnist,
# fashion_mnist). Whole words: data/digital_art is not digits.
TEXT_LIKE_NAMES = ("svhn", "usps", "digit", "digits", "letter", "letters", "glyph", "glyphs", "font", "fonts")


def looks_like_text(args):
    """Whether --hflip auto should leave flips off: the data's name or its parent folder's names digits or
    letters (data/mnist/train and data/mnist_png/training count, not only data/mnist)."""
    if not args.dataset_path:
        names = [dataset_name(args)]
    else:
        path = os.path.normpath(os.path.abspath(args.dataset_path))
        names = [os.path.basename(path), os.path.basename(os.path.dirname(path))]
    words = [word for name in names for word in re.split(r"[^a-z0-9]+", name.lower())]
    return any(word.endswith("mnist") or word in TEXT_LIKE_NAMES for word in words)


def main(argv=None):
    args, typed = parse_args(argv)
    run_name = args.run_name or dataset_name(args) + RUN_SUFFIX[args.task]
    full_path = os.path.join(args.checkpoint_dir, f"{run_name}.pt")
    ema_path = os.path.join(args.checkpoint_dir, f"{run_name}_ema.pt")

    resumed, ignored, moved = None, [], []
    if args.resume:
        args, resumed, ignored, moved = load_resumed_run(args, typed, full_path)
    resolve_process_defaults(args)
    check_args(args)
    if not args.resume:  # a run made before the rule keeps its name
        check_run_name(run_name, given="run_name" in typed)
    check_outputs_outside_data(args)
    earlier = [] if args.resume else run_files(args.checkpoint_dir, run_name)
    if earlier and not args.overwrite:
        raise UsageError(f"{earlier[0]} already holds a run named {run_name!r}: add --resume to continue it, "
                         "--run_name NAME to start another beside it, or --overwrite to replace it")
    if args.task == "super_resolution":  # the defaults scale with T (see cascade.py)
        given = args.sample_aug_t is not None and not args.resume
        args.aug_max_t = args.timesteps // 10 if args.aug_max_t is None else args.aug_max_t
        args.sample_aug_t = min(args.timesteps // 50, args.aug_max_t) if args.sample_aug_t is None else args.sample_aug_t
        if given and args.aug_max_t == 0 and args.sample_aug_t > 0:  # cascade.sampling_level would ignore it
            raise UsageError(f"--sample_aug_t {args.sample_aug_t}: with --aug_max_t 0 the model is trained and sampled "
                             "without conditioning augmentation; leave out --sample_aug_t")
        if given and args.sample_aug_t > args.aug_max_t:
            raise UsageError(f"--sample_aug_t {args.sample_aug_t}: above --aug_max_t {args.aug_max_t}, a level the "
                             "model would never see in training")
    writer_class = None
    if args.tensorboard:  # an optional extra: imported only when asked for, and checked before any work
        try:
            from torch.utils.tensorboard import SummaryWriter as writer_class
        except ImportError:
            raise UsageError("--tensorboard: the tensorboard package is not installed; pip install tensorboard, "
                             "or train without the flag (loss.csv is written either way)") from None

    rank, world_size, device = setup_distributed(args.device)
    keep_freed_memory()  # glibc: stop handing the step's big buffers back to the OS (utils.py; README: Speed)
    say = print if rank == 0 else (lambda *a, **k: None)  # one process speaks, logs, draws and saves
    if ignored:
        say(f"note: --resume continues the run with its saved settings, so these flags are ignored: {'; '.join(ignored)}. "
            "Only the run-control flags (README: Train on your own images) change on resume")
    if moved:
        say(f"note: reading the data from {'; '.join(moved)}")
    seed_everything(args.seed)  # the same seed everywhere: every process builds the same initial weights
    # Diffusion before data: it checks that the loss, prediction and variance settings fit together.
    if args.process == "cold":  # Cold Diffusion (cold.py): a deterministic degradation, a restoration loss
        diffusion = ColdDiffusion(args.degradation, args.timesteps, args.image_size, args.loss).to(device)
    else:
        diffusion = GaussianDiffusion(args.timesteps, args.schedule, args.loss, prediction=args.prediction,
                                      learn_sigma=args.learn_sigma, min_snr_gamma=args.min_snr_gamma).to(device)
    t_range = expert_t_range(args)  # all of 0 .. T-1, or an expert's interval (eDiff-I, experts.py)
    timestep_sampler = TimestepSampler(args.timesteps, args.timestep_sampler, t_range=t_range)
    dataset = load_dataset(args)
    class_names = list(dataset.class_names) if len(dataset.class_names) > 1 else []
    if len(dataset.class_names) == 1:  # class folders were made, but a label that never varies teaches nothing
        say(f"note: only one class folder ({dataset.class_names[0]}) holds images, so the model is unconditional")
    if args.task == "classifier" and not class_names:
        raise UsageError("--task classifier: the data has no classes; put the images in one subfolder per class")
    if args.task in ("super_resolution", "image_to_image"):
        class_names = []  # these models are conditioned on an image, not on a label
    if resumed and "class_names" in resumed:
        class_names = resumed_class_names(list(resumed["class_names"]), dataset, class_names, args.dataset, say)
    if args.process == "cold":  # where generation starts: a mixture over the data's channel means (cold.py)
        if resumed:
            diffusion.start_mixture = resumed["cold_config"]["start_mixture"]
        else:
            picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:2000]
            means = cold.channel_means(torch.stack([dataset[i][0] for i in picks.tolist()]))
            diffusion.start_mixture = cold.fit_start_mixture(means, seed=args.seed)
    # After --resume, args hold the saved run's data: `--run_name X --resume` alone names none on the command line.
    if args.hflip == "auto":  # decided once and saved as on/off, so that a resumed run keeps it
        # A run saved as "auto" by an older version keeps that version's rule: "mnist" in the data's name.
        text_like = "mnist" in dataset_name(args).lower() if resumed else looks_like_text(args)
        args.hflip = "off" if text_like else "on"
    hflip = args.hflip == "on"
    if len(dataset) // world_size < args.batch_size:
        per_process = len(dataset) // world_size
        if per_process < 1:
            raise UsageError(f"the dataset has {len(dataset)} images, fewer than the {world_size} processes")
        say(f"note: the dataset has only {len(dataset)} images ({per_process} per process); "
            f"--batch_size lowered from {args.batch_size}")
        args.batch_size = per_process

    resolve_config, build = (resolve_classifier_config, build_classifier) if args.task == "classifier" else (
        resolve_model_config, build_model)
    model_config = resolve_config(**network_settings(args, dataset, class_names))
    model = build(model_config).to(device)
    if args.init_from and not resumed:  # fine-tuning: the EMA copy below starts from the same weights
        init_step = init_weights_from(model, args.init_from, model_config, diffusion.config(), args.task)
        say(f"starting from {args.init_from} (its EMA weights at step {init_step})")
    if args.grad_checkpointing:
        model.grad_checkpointing = True  # model.py: blocks recompute their activations in backward
    # Mixed precision: autocast runs the network's matrix products in 16 bits; the weights, the EMA, the
    # SWA average and AdamW's moments stay fp32. fp16 needs loss scaling (GradScaler), bf16 does not.
    amp = resolve_amp(args.amp, device)
    if args.amp == "auto" and device.type == "cpu":  # bf16 pays only where the CPU has bf16 matrix hardware
        say(f"--amp auto: {'bf16 (this CPU has AMX or AVX-512 BF16)' if amp == 'bf16' else 'fp32 (this CPU has no bf16 matrix hardware, where bf16 is slower)'}")
    if args.warmup_steps >= args.max_steps and not resumed:
        say(f"note: --warmup_steps {args.warmup_steps} is not below --max_steps {args.max_steps}: the learning rate "
            "rises for the whole run and never decays; lower --warmup_steps")
    if note := emulated_bf16_note(args.amp, amp, device):
        say(note)
    if amp == "fp16" and device.type != "cuda":
        raise UsageError(f"--amp fp16 needs a CUDA device (its loss scaling is CUDA's); use --amp bf16 on {device}")
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    autocast = torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                              enabled=amp != "off")
    # Memory layout (utils.resolve_channels_last): NHWC where it is faster, before the EMA copy takes it.
    channels_last = resolve_channels_last(args.channels_last, device, amp)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)  # a separate copy, never the live weights
    # Stochastic weight averaging: the plain mean of the weights after every step from --swa_start on.
    swa_model = AveragedModel(model) if args.swa_start is not None else None
    # From here torch's global generator drives dropout (one stream per process) and the sample grids' per-step
    # noise. Seeded apart from the grids' fixed x_T (a generator seeded with --seed, below): with the same seed
    # and no dropout to advance it, the first grid's first noise draw would be its x_T itself.
    torch.manual_seed(args.seed + rank + 1)
    randomness = SharedRandomness(args.seed, rank, world_size, device)  # t, noise, flips: shared, see scaling.py

    # AdamW; the fused kernel on CUDA, the multi-tensor ("foreach") one elsewhere.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    # --max_minutes: the cosine also follows the fraction of the time budget used so far (lr_lambda).
    # train_seconds: time spent in training steps (grids and saving left out), over every resumed part.
    budget_s, train_seconds = (args.max_minutes * 60 if args.max_minutes else None), 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(
        step, args.warmup_steps, args.max_steps, train_seconds / budget_s if budget_s else 0.0))

    step = 0
    if resumed:
        saved_config = resolve_config(**resumed["model_config"])  # with settings added since filled in
        restore_training_state(resumed, full_path, saved_config, model_config, model, ema_model, swa_model,
                               optimizer, scheduler, scaler, timestep_sampler)
        step, train_seconds = resumed["step"], resumed.get("train_seconds", 0.0)
        if not restore_rng_states(resumed["rng"], randomness, device, rank, world_size):
            randomness.generator.manual_seed(args.seed + step)
            say(f"note: {full_path} was saved by an older train.py or by another number of processes; training "
                "continues correctly, but the random numbers and data order differ from an uninterrupted run")

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    config["run_name"] = run_name
    config["attention_resolutions"] = model_config["attention_resolutions"]  # the resolved default, not None
    config["conditioning"] = conditioning_settings(args)
    config["world_size"] = world_size  # for the record; --batch_size is per process
    config["t_range"] = list(t_range)
    say(f"run {run_name}: {len(dataset)} images ({dataset.channels}-channel, {args.image_size}x{args.image_size}), "
        f"{len(class_names) or 'no'} classes, {'random flips' if hflip else 'no flips'}, device {device}"
        f"{f', {world_size} processes' if world_size > 1 else ''}{', resuming at step ' + str(step) if resumed else ''}")
    say(diffusion.describe())
    if t_range != (0, args.timesteps - 1):
        say(f"expert denoiser (eDiff-I, experts.py): trains on t = {t_range[0]}..{t_range[1]} of 0..{args.timesteps - 1}. "
            "Its sample grids use it at every t, so they will look poor; sample with every expert: "
            "sample.py --ckpt A_ema.pt --ckpt B_ema.pt")
    say(f"model: {count_parameters(model) / 1e6:.2f} M parameters, {model_config}")
    say("settings:", {k: v for k, v in config.items() if k not in model_config})

    # Fail now, not at the first save an hour from now: both folders writable, room for the checkpoints
    # (full: weights, EMA, SWA, AdamW's two moments; EMA file: EMA and SWA), twice over while a new one
    # is written beside the old, plus the step-numbered ones kept.
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    averages = 2 if swa_model is not None else 1
    bytes_needed = weight_bytes * ((3 + averages) + averages) * (max(args.keep_last, 1) + 1)
    check_output_folder(args.checkpoint_dir, "--checkpoint_dir", bytes_needed)
    run_sample_dir = os.path.join(args.sample_dir, run_name)
    check_output_folder(run_sample_dir, "--sample_dir")
    if rank == 0:
        remove_stale_temporaries(args.checkpoint_dir, run_name)
        for path in earlier:  # --overwrite: the earlier run's step-numbered files would outlive its rotation
            os.remove(path)
        if earlier:
            say(f"--overwrite: removed the earlier run's {len(earlier)} checkpoint files ({', '.join(earlier)})")

    # What the loss is computed with: the network, wrapped for several processes and compiled if asked.
    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    no_sync = train_model.no_sync if world_size > 1 else contextlib.nullcontext
    if args.compile:
        train_model = compile_or_fallback(train_model, device, say)

    num_workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    sampler = ResumableSampler(dataset, rank, world_size, args.seed)
    # The loader gets its own generator so that starting it (each epoch, and on resume) draws nothing
    # from the global one: the random streams stay exactly those of an uninterrupted run.
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=num_workers > 0, worker_init_fn=quiet_worker_signals,
                                         generator=torch.Generator().manual_seed(args.seed))
    batches = endless_batches(loader, sampler, step * args.accumulation_iters)

    def loss_fn(batch):
        """One micro-batch -> (per-image losses [B], t [B]), for whichever --task. Every random number
        comes from `randomness`, drawn for the global batch (SharedRandomness)."""
        images, labels = batch  # labels: class indices; for image_to_image, the paired input images
        x0 = to_model_range(images.to(device, non_blocking=True))           # uint8 -> [-1, 1]
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        b = x0.shape[0]
        cond = to_model_range(labels.to(device)) if args.task == "image_to_image" else None
        if hflip:  # flip a random half of the batch, each image on its own coin (a pair flips together)
            flip = randomness.rand(b)[:, None, None, None] < 0.5
            x0 = torch.where(flip, x0.flip(-1), x0)
            cond = torch.where(flip, cond.flip(-1), cond) if cond is not None else None

        if args.task == "classifier":  # a classifier of x_t ~ q(x_t | x_0) at uniform t (ADM Sec. 4)
            t = randomness.randint(args.timesteps, b)
            noise = randomness.randn(x0.shape)
            with autocast:
                return classifier_training_loss(train_model, diffusion, x0, labels.to(device), t, noise), t

        y, network = None, train_model
        if class_names:  # CFG Algorithm 1: each label dropped to "no label" (index K) with prob p_uncond
            y = drop_labels(labels.to(device), args.p_uncond, len(class_names), coins=randomness.rand(b))
        if args.task == "super_resolution":  # SR3 input, with Cascaded Diffusion's conditioning augmentation
            cond = cascade.low_res_condition(x0, args.low_res)
            cond_t = None
            if args.aug_max_t > 0:
                cond_t = randomness.rows(cascade.random_augmentation_levels(b * world_size, args.aug_max_t, device,
                                                                            randomness.generator))
                cond = cascade.augment_condition(diffusion, cond, cond_t, noise=randomness.randn(cond.shape))
            network = cascade.conditioned(train_model, cond, cond_t)
        elif cond is not None:
            network = cascade.conditioned(train_model, cond)
        if args.process == "cold":  # the restoration loss || R(D(x_0, t + 1), t) - x_0 || (cold.py)
            t = randomness.randint(args.timesteps, b)
            with autocast:
                losses, t = diffusion.training_loss(network, x0, y, t)
            return losses.float(), t
        # Alg. 1 line 3 (importance weights are 1 for the uniform sampler), for the global batch
        all_t, all_weights = timestep_sampler.sample(b * world_size, device, randomness.generator)
        t, weights = randomness.rows(all_t), randomness.rows(all_weights)
        noise = randomness.randn(x0.shape)                                  # Alg. 1 line 4
        with autocast:
            if args.loss in VLB_LOSSES:
                losses, t = improved_ddpm.training_loss(diffusion, network, x0, y, t, noise)  # IDDPM eq. 16 / L_vlb
            else:
                losses, t = diffusion.training_loss(network, x0, y, t, noise)   # Algorithm 1
        if timestep_sampler.kind != "uniform":  # every process keeps the same loss history
            timestep_sampler.update(all_t, randomness.gather_rows(losses.detach().float()))
        step_weights.append(weights)  # for the per-quarter means of the log (step_statistics)
        return losses.float() * weights, t

    # Fixed noise, labels, conditioning images or starts for every sample grid, so grids over training
    # are comparable; and what draws them: Algorithm 2 over all T steps, or respaced (IDDPM eq. 19).
    fixed = fixed_grid_inputs(args, dataset, diffusion, class_names, device)
    grid_diffusion = diffusion
    if args.process != "cold" and args.sample_steps and args.sample_steps < args.timesteps:
        grid_diffusion = improved_ddpm.respace(diffusion, args.sample_steps)
    log = TrainingLog(run_sample_dir, args.timesteps, step if resumed else None, writer_class, active=rank == 0)

    def what_is_kept():  # for the messages of a run that stops without saving
        return f"the last checkpoint {full_path} is kept" if os.path.isfile(full_path) else "no checkpoint yet"

    def save():
        """Both checkpoints, written by process 0; never weights that are not finite."""
        if not weights_are_finite(model, ema_model, swa_model):
            raise UsageError(f"step {step}: the weights are no longer finite; nothing saved, {what_is_kept()}. Try a "
                             "lower --lr, or --amp bf16 instead of fp16")
        states = checkpoint_states(step, model, ema_model, swa_model, optimizer, scheduler, scaler, config,
                                   model_config, diffusion.config(), class_names, timestep_sampler,
                                   rng_states(randomness, device, world_size),
                                   train_seconds)
        if rank == 0:
            write_checkpoints(*states, full_path, ema_path, step, args.keep_last)

    def draw_grid():
        """sample_grid on process 0, on its own copy of the random streams: drawing a grid, or not,
        never changes the training that follows. The first stop signal cuts it short."""
        signals.drawing_grid = True
        try:
            with forked_rng(device):
                path = os.path.join(run_sample_dir, f"step_{step:07d}.png")
                message, path = sample_grid(args, ema_model, diffusion, grid_diffusion, fixed, path)
        except KeyboardInterrupt:
            return "grid interrupted"
        finally:
            signals.drawing_grid = False
        if path is not None:
            log.add_image(path, step)
        return message

    if resumed and step >= args.max_steps:
        say(f"note: the run is already at step {step}, not below --max_steps {args.max_steps}: nothing to train; "
            "pass a larger --max_steps to continue it")
    signals = StopSignals()
    model.train()
    reset_peak_memory(device)  # loss.csv's peak_memory_mb: the training's, not the data loading's
    bar = tqdm(total=args.max_steps, initial=step, desc=run_name, dynamic_ncols=True, disable=rank != 0)
    skipped_in_a_row, stop, out_of_time, step_weights = 0, False, False, []
    seconds_before, loop_started = train_seconds, time.perf_counter()
    try:
        while step < args.max_steps and not stop and not out_of_time:
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(args.accumulation_iters)]
            step_weights.clear()
            losses, t = accumulate_gradients(loss_fn, micro_batches, scaler, no_sync)
            loss, by_quarter, stop, train_seconds = step_statistics(
                losses, t, args.timesteps, signals.requested, world_size, seconds_before + time.perf_counter() - loop_started,
                torch.cat(step_weights) if step_weights else None)  # none for the classifier and Cold Diffusion
            scaler.unscale_(optimizer)  # clip the true gradient, not the loss-scaled one
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            # The same on every process: the gradients were averaged over processes, the loss too.
            finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
            if finite:
                scaler.step(optimizer)
            scaler.update()  # fp16: a smaller loss scale after an overflow
            optimizer.zero_grad(set_to_none=True)
            if budget_s:  # the same on every process (step_statistics)
                out_of_time = train_seconds >= budget_s
            lr = scheduler.get_last_lr()[0]  # the rate this step used, for the log
            scheduler.step()
            if finite:
                update_ema(ema_model, model, args.ema_decay, step)
            step += 1
            if finite and swa_model is not None and step > args.swa_start:
                swa_model.update_parameters(model)

            images_per_s = args.batch_size * args.accumulation_iters * world_size / (time.perf_counter() - started)
            log.add([step, loss, lr, images_per_s, peak_memory_mb(device), *by_quarter])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
            if not finite:  # skip the step: no update, and the weights, EMA and SWA stay as they were
                skipped_in_a_row += 1
                bad_t = t[~torch.isfinite(losses)].tolist()[:16]
                problem = (f"step {step}: the loss or gradient is not finite (loss {loss}, t of the non-finite "
                           f"images here: {bad_t})")
                if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                    log.flush()
                    since = f"since {full_path}" if os.path.isfile(full_path) else "(no checkpoint yet)"
                    raise UsageError(f"{problem}, {MAX_SKIPPED_STEPS} steps in a row. Stopped; nothing saved {since}. "
                                     "Try a lower --lr, or --amp bf16 instead of fp16")
                if rank == 0:
                    bar.write(f"warning: {problem}; step skipped, weights unchanged"
                              + (" (fp16 loss scaling overflows a few times at first)" if amp == "fp16" else ""))
            else:
                skipped_in_a_row = 0
            finished = step == args.max_steps or out_of_time
            paused = time.perf_counter()  # saving and grids are not training: --max_minutes leaves them out
            if step % args.save_every == 0 or finished or stop:
                log.flush()
                save()
            grid_now = not stop and args.sample_every and (step % args.sample_every == 0 or finished)
            if grid_now and rank == 0:
                bar.write(f"step {step}: {draw_grid()}")
            if grid_now and world_size > 1:  # process 0 draws it: the others wait here, off the clock too
                dist.barrier()
            loop_started += time.perf_counter() - paused
    except KeyboardInterrupt:  # a second signal: quit at once
        bar.close()
        say(f"\nstopped at step {step} without saving; {what_is_kept()}")
        sys.exit(130)
    finally:
        bar.close()  # before any error message, so that the message is the last line
        shut_down_workers(loader)  # data-loading processes, if any (--num_workers; 4 on CUDA)
        signals.restore()
    log.close()
    if stop and step < args.max_steps:
        say(f"\ninterrupted at step {step}: saved {full_path} and {ema_path}; continue with --resume")
        sys.exit(130)
    restores_only = args.process == "cold" and args.degradation not in cold.GENERATES  # mask: cannot generate
    use = {"diffusion": f"python sample.py --ckpt {ema_path}" + (" --cold_restore <images>" if restores_only else ""),
           "classifier": f"python sample.py --ckpt <a diffusion model's _ema.pt> --classifier_ckpt {ema_path}",
           "super_resolution": f"python sample.py --ckpt <base _ema.pt> --sr_ckpt {ema_path}, or "
                               f"--ckpt {ema_path} --cond_images <low-res images>",
           "image_to_image": f"python sample.py --ckpt {ema_path} --cond_images <input images>"}[args.task]
    if out_of_time:
        say(f"--max_minutes {args.max_minutes:g} reached after {train_seconds / 60:.1f} minutes of training, at step {step}")
    say(f"done at step {step}: {full_path} (to resume) and {ema_path} (to use: {use})")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process hits it; one says so
            sys.exit(f"error: {error}")
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first): while loading, say
        print("\ninterrupted; checkpoints written before now are kept", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as error:  # out of memory: one line with the flags that help, not a traceback
        message = out_of_memory(error, "lower --batch_size (or --image_size, --base_channels), or try "
                                "--grad_checkpointing or --amp; checkpoints written before now are kept")
        if message is None:
            raise
        sys.exit(f"error: {message}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
