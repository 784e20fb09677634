"""
sample.py: draw images from a trained checkpoint.

    python sample.py --ckpt checkpoints/cars_ema.pt                          # Algorithm 2, all T steps
    python sample.py --ckpt checkpoints/cars_ema.pt --sampler ddim --steps 50 # DDIM (ddim.py): 20x fewer calls
    python sample.py --ckpt checkpoints/cars_ema.pt --steps 100              # DDPM respaced (improved_ddpm.py)
    python sample.py --ckpt checkpoints/cars_ema.pt --interpolate 10         # slerp between two x_T, decoded by DDIM
    python sample.py --ckpt checkpoints/cars_ema.pt --invert my_photos/      # image -> x_T -> image (DDIM inversion)
    python sample.py --ckpt checkpoints/cars_ema.pt --num_samples 64 --individual_dir out/ --gif rev.gif

Conditioning and upscaling (guidance.py, cascade.py, realesrgan.py):

    python sample.py --ckpt checkpoints/mnist_ema.pt --class_name 3 7 --guidance_scale 3   # classifier-free
    python sample.py --ckpt checkpoints/mnist_ema.pt --classifier_ckpt checkpoints/mnist_classifier_ema.pt \\
                     --classifier_scale 2                                                   # classifier guidance
    python sample.py --ckpt checkpoints/cars_ema.pt --sr_ckpt checkpoints/cars_sr_ema.pt    # a cascade
    python sample.py --ckpt checkpoints/cars_sr_ema.pt --cond_images small_photos/          # SR your own images
    python sample.py --ckpt checkpoints/cars_ema.pt --upscale 4 --upscale_mode bicubic     # or realesrgan

Expert denoisers (experts.py, eDiff-I): one --ckpt per expert; each is used for the t it was trained on.

    python sample.py --ckpt checkpoints/low_t_ema.pt --ckpt checkpoints/high_t_ema.pt

The checkpoint describes itself (model and diffusion configuration, class names, the prediction
target, learned variances, what it is conditioned on), so no other flag is needed. Either file works:
<run>_ema.pt, or the full <run>.pt. Both are sampled with their EMA weights, which give better images
than the raw training weights; --weights picks others for the --ckpt model:

    python sample.py --ckpt checkpoints/cars_ema.pt --weights swa   # the average since train.py --swa_start
    python sample.py --ckpt checkpoints/cars.pt --weights raw       # the live weights: only in the full file
"""
import argparse
import math
import os
import signal
import sys
import time

import torch
from PIL import Image

import cascade
from ddim import SPACINGS, check_eta, ddim_invert, ddim_sample, interpolation_noise
from ddpm import VARIANCES, GaussianDiffusion
from cold import COLD_SAMPLERS, ColdDiffusion
from experts import ExpertEnsemble, check_compatible, check_coverage, expert_range
from guidance import classifier_free_guidance, classifier_guidance
from improved_ddpm import respace
from model import build_classifier, build_model
from utils import (HelpFormatter, UsageError, check_keys, check_output_file, check_output_folder, emulated_bf16_note,
                   from_model_range, is_image_file, list_images, load_checkpoint, load_image, load_weights,
                   make_grid_image, out_of_memory, pick_device, prepare_network, refuse_fp16_on_cpu, resize_uint8,
                   resolve_amp, save_gif, save_grid, save_image, seed_everything, stacked_rows, to_model_range)

UPSCALE_MODES = ("nearest", "bicubic", "sr", "realesrgan")
WEIGHTS = ("ema", "swa", "raw")  # the weight sets a checkpoint can hold (see pick_weights)
MAX_CLASS_ROWS = 20  # with no --class_name/--class_label, a grid shows at most this many classes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images from a checkpoint written by train.py.",
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, action="append",
                   help="checkpoints/<run>_ema.pt or checkpoints/<run>.pt; repeat it to sample with an ensemble of "
                   "expert denoisers (eDiff-I, experts.py), each trained on its interval of t with train.py "
                   "--t_min/--t_max")
    p.add_argument("--weights", default="ema", choices=WEIGHTS,
                   help="which weights of --ckpt to sample with: ema, the exponential moving average (usually the "
                   "best images); swa, the plain mean of the weights since train.py --swa_start (stochastic "
                   "weight averaging); raw, the last training weights, only in the full <run>.pt. --sr_ckpt and "
                   "--classifier_ckpt always use their EMA weights")
    p.add_argument("--num_samples", type=int, default=None,
                   help="images to draw (default 16), or for a class-conditional model images per class "
                   "(default 4, one row per class); rows of the --interpolate strip (default 4); "
                   "images to --invert or --cond_images to use (default: all, at most 16)")
    p.add_argument("--batch_size", type=int, default=64, help="images denoised at once (lower it if memory is short); the per-step noise is drawn batch by "
                        "batch, so with the same --seed another batch size gives other DDPM samples")
    p.add_argument("--seed", type=int, default=0, help="seed for the starting noise and every step's noise")
    p.add_argument("--out", default=None, help="grid PNG; default samples/<checkpoint name>[_interpolation|_inversion|_outputs|_restored].png")
    p.add_argument("--individual_dir", default=None, help="also write one PNG per sample into this folder")
    p.add_argument("--gif", default=None, help="also write the reverse process of the first batch as a GIF "
                   "(x_t on the left, the predicted x_0 on the right)")
    p.add_argument("--gif_frames", type=int, default=None, help="frames in the --gif (default 50)")
    colds = p.add_argument_group("Cold Diffusion checkpoints (cold.py; train.py --process cold)")
    colds.add_argument("--cold_sampler", default="improved", choices=COLD_SAMPLERS,
                       help="improved: Algorithm 2, x_{s-1} = x_s - D(x0_hat, s) + D(x0_hat, s-1); naive: "
                       "Algorithm 1, x_{s-1} = D(x0_hat, s-1)")
    colds.add_argument("--cold_restore", default=None, metavar="PATH",
                       help="instead of generating: degrade these images (a file or a folder) to --cold_level and "
                       "restore them; writes degraded / restored / original rows")
    colds.add_argument("--cold_level", type=int, default=None,
                       help="the level --cold_restore degrades to, 1 .. T (default T/2)")
    sampler = p.add_argument_group("sampler")
    sampler.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"),
                         help="ddpm: Algorithm 2 (ancestral), respaced when --steps < T; ddim: DDIM eq. 12")
    sampler.add_argument("--steps", type=int, default=None,
                         help="network calls per image: default all T for ddpm, 50 for ddim")
    sampler.add_argument("--eta", type=float, default=None,
                         help="DDIM noise scale (eq. 16), 0 to 1: 0 = deterministic (default), 1 = DDPM's "
                              "posterior variance")
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
    cond = p.add_argument_group("classes and guidance (guidance.py)")
    cond.add_argument("--class_name", nargs="+", default=None, help="draw these classes (folder names)")
    cond.add_argument("--class_label", type=int, nargs="+", default=None, help="draw these classes (indices)")
    cond.add_argument("--guidance_scale", type=float, default=1.0,
                      help="classifier-free guidance s: eps_uncond + s (eps_cond - eps_uncond); 1 = no guidance "
                      "(the conditional model), 0 = unconditional, > 1 = stronger class features")
    cond.add_argument("--classifier_ckpt", default=None,
                      help="a noisy classifier (train.py --task classifier) for classifier guidance (ADM)")
    cond.add_argument("--classifier_scale", type=float, default=None,
                      help="classifier guidance gradient scale s (ADM Sec. 4.3), default 1; 0 = no guidance")
    image = p.add_argument_group("image conditioning and upscaling (cascade.py, realesrgan.py)")
    image.add_argument("--cond_images", default=None, metavar="PATH",
                       help="for a super_resolution or image_to_image --ckpt: the input images (a file or a folder)")
    image.add_argument("--sr_ckpt", default=None,
                       help="a super_resolution checkpoint: upsample the samples with it (a cascade)")
    image.add_argument("--upscale", type=int, default=None,
                       help="enlarge the samples by this factor (default: the --sr_ckpt's factor, else 4)")
    image.add_argument("--upscale_mode", default=None, choices=UPSCALE_MODES,
                       help="how to --upscale: plain interpolation, the --sr_ckpt model, or Real-ESRGAN "
                       "(default: sr with --sr_ckpt, else bicubic)")
    image.add_argument("--realesrgan_weights", default=None,
                       help="RealESRGAN_x4plus.pth for --upscale_mode realesrgan (never downloaded for you; "
                       "default weights/RealESRGAN_x4plus.pth)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--amp", nargs="?", const="auto", default="off", choices=("off", "auto", "bf16", "fp16"),
                   help="run the network in bf16 (or fp16 on a GPU) autocast, the rest of the sampler in fp32: "
                   "faster where the hardware multiplies 16-bit numbers (README, Speed); --amp alone = auto, "
                   "decided as train.py --amp decides it (on a CPU bf16 only with AMX or AVX-512 BF16, else fp32)")
    args = p.parse_args(argv)
    # Flags that only mean something beside another one are refused alone (they would do nothing), so
    # their defaults are set here, after that check.
    for flag, needs, given in (("--gif_frames", "--gif", args.gif), ("--classifier_scale", "--classifier_ckpt",
                               args.classifier_ckpt), ("--realesrgan_weights", "--upscale_mode realesrgan",
                               args.upscale_mode == "realesrgan")):
        if getattr(args, flag[2:]) is not None and not given:
            raise UsageError(f"{flag} goes with {needs}; add it, or leave out {flag}")
    args.gif_frames = 50 if args.gif_frames is None else args.gif_frames
    args.classifier_scale = 1.0 if args.classifier_scale is None else args.classifier_scale
    args.realesrgan_weights = args.realesrgan_weights or os.path.join("weights", "RealESRGAN_x4plus.pth")
    return args


def check_counts(args):
    """The counts every kind of checkpoint uses, Gaussian and Cold Diffusion alike."""
    if (args.num_samples is not None and args.num_samples < 1) or args.batch_size < 1 or args.gif_frames < 1:
        raise UsageError("--num_samples, --batch_size and --gif_frames must be at least 1")
    if not 0 <= args.seed < 2**32:  # numpy's seeds
        raise UsageError(f"--seed {args.seed}: must be in 0 .. 2^32 - 1")


def check_args(args, timesteps):
    """Bad combinations, each named with its flag, before any work."""
    check_counts(args)
    if args.interpolate is not None and args.interpolate < 2:
        raise UsageError(f"--interpolate {args.interpolate}: need at least 2 images per row (the two ends)")
    if args.interpolate and args.invert:
        raise UsageError("give --interpolate or --invert, not both")
    deterministic_mode = args.interpolate or args.invert
    if args.sampler == "ddpm" and not deterministic_mode and args.eta is not None:
        raise UsageError("--eta is DDIM's noise scale (eq. 16); add --sampler ddim")
    if deterministic_mode and args.eta:
        raise UsageError("--interpolate and --invert use deterministic DDIM (eta 0); leave out --eta")
    if args.eta is not None:
        check_eta(args.eta)
    if args.variance and (args.sampler == "ddim" or deterministic_mode):  # DDIM's sigma_t is eq. 16's
        raise UsageError("--variance sets DDPM's sigma_t^2 (Algorithm 2); DDIM's noise comes from --eta (eq. 16), "
                         "so leave out --variance or use --sampler ddpm")
    for flag in ("invert", "cond_images"):
        if getattr(args, flag) and not os.path.exists(getattr(args, flag)):
            raise UsageError(f"--{flag} {getattr(args, flag)}: no such file or folder")
    if args.steps is not None and not 1 <= args.steps <= timesteps:
        raise UsageError(f"--steps {args.steps}: must be between 1 and the model's T = {timesteps}")
    if args.class_name and args.class_label:
        raise UsageError("give --class_name or --class_label, not both")
    if not all(math.isfinite(s) and s >= 0 for s in (args.guidance_scale, args.classifier_scale)):
        raise UsageError("--guidance_scale and --classifier_scale must be finite and >= 0 (--guidance_scale 1 is no "
                         "guidance and 0 the unconditional model; --classifier_scale 0 is no guidance)")
    if deterministic_mode and (args.individual_dir or args.gif or args.class_name or args.class_label):
        raise UsageError("--interpolate and --invert write one grid (--out): leave out --individual_dir and --gif; "
                         "their classes come from the images (--invert) or in turn (--interpolate), so leave out "
                         "--class_name and --class_label")
    if args.individual_dir and os.path.exists(args.individual_dir):
        if not os.path.isdir(args.individual_dir):
            raise UsageError(f"--individual_dir {args.individual_dir}: a file; name a folder")
        earlier = [f for f in os.listdir(args.individual_dir) if f.startswith("sample_") and f.endswith(".png")]
        if earlier:  # they would be overwritten, or, with fewer samples now, mixed with these (evaluate.py)
            raise UsageError(f"--individual_dir {args.individual_dir}: already holds {len(earlier)} sample_*.png "
                             "from an earlier run; pick a new folder (or move those away)")
    check_outputs(args)
    if args.invert and args.classifier_ckpt:
        raise UsageError("--invert runs DDIM's ODE both ways without a classifier (ddim_invert); leave out --classifier_ckpt")
    if args.upscale is not None and args.upscale < 2:
        raise UsageError(f"--upscale {args.upscale}: must be at least 2")
    if args.upscale_mode == "sr" and not args.sr_ckpt:
        raise UsageError("--upscale_mode sr needs --sr_ckpt (a model trained with train.py --task super_resolution)")
    if args.sr_ckpt and args.upscale_mode not in (None, "sr"):  # the SR model would be loaded, run, and unused
        raise UsageError(f"--sr_ckpt upscales with the SR model; --upscale_mode {args.upscale_mode} would not use it: "
                         "leave out one of them")
    if args.upscale_mode == "realesrgan":  # a missing or wrong file is said before any sampling, not after
        from realesrgan import load_realesrgan
        load_realesrgan(args.realesrgan_weights)
    if (args.interpolate or args.invert or args.cond_images) and (args.sr_ckpt or args.upscale or args.upscale_mode):
        raise UsageError("--sr_ckpt, --upscale and --upscale_mode apply to drawn samples; leave out "
                         "--interpolate, --invert and --cond_images")


def check_outputs(args):
    """--out, --gif and --individual_dir, checked before any sampling (Gaussian and Cold Diffusion alike):
    the right kind of file name, in a place that can be written."""
    if args.out:  # now, not after minutes of sampling
        check_output_file(args.out, "--out", (".png", ".jpg", ".jpeg", ".webp"))
    if args.gif:  # another name would save one still frame
        check_output_file(args.gif, "--gif", (".gif",))
    if args.individual_dir:
        check_output_folder(args.individual_dir, f"--individual_dir {args.individual_dir}: the folder")


def load_labelled_images(path, limit, size, channels, class_names, flag="--invert"):
    """uint8 [N x C x S x S] and labels (int64 [N] or None) for --invert and --cold_restore. A
    class-conditional model needs each image's class: it is read from the name of the folder holding
    the image."""
    paths = [path] if os.path.isfile(path) else list_images(path)
    if os.path.isfile(path) and not is_image_file(path):
        raise UsageError(f"{flag} {path}: not an image file")
    if not paths:
        raise UsageError(f"{flag} {path}: no images found in this folder")
    paths = readable_images(paths, limit, f"{flag} {path}")
    images = torch.stack([load_image(p, size, channels) for p in paths])
    if not class_names:
        return images, None
    labels = []
    for p in paths:
        folder = os.path.basename(os.path.dirname(os.path.abspath(p)))
        if folder not in class_names:
            raise UsageError(f"{flag} {p}: this model is class-conditional and '{folder}' is not one of its "
                             f"classes ({', '.join(class_names[:5])}...); put the image in a folder named after its class")
        labels.append(class_names.index(folder))
    return images, torch.tensor(labels)


def pick_weights(state, path, weights):
    """The state dict for --weights: 'ema' (both files), 'swa' (both files, once the run reached
    --swa_start; stored with the model's own keys) or 'raw' (the live weights, under 'model' in the full
    <run>.pt only)."""
    if weights == "raw" and "model" not in state:
        base, ext = os.path.splitext(path)
        full = base[:-len("_ema")] + ext if base.endswith("_ema") else "<run>.pt"
        raise UsageError(f"--weights raw: {path} holds only averaged weights; the raw weights are only in the "
                         f"full checkpoint {full}")
    if weights == "swa" and "swa" not in state:
        raise UsageError(f"--weights swa: {path} holds no SWA weights; the run had no --swa_start (or had not "
                         "reached it), so use --weights ema")
    return state[{"ema": "ema", "swa": "swa", "raw": "model"}[weights]]


def describe_weights(state, weights):
    """'EMA weights' and the like, for the line that reports the checkpoint."""
    if weights == "swa":
        count = state.get("swa_count")
        return f"SWA weights (mean of {count} models)" if count else "SWA weights"
    return {"ema": "EMA weights", "raw": "raw weights"}[weights]


def load_diffusion_model(path, flag, device, variance=None, weights="ema", state=None, amp="off"):
    """A diffusion checkpoint -> (state, GaussianDiffusion, UNet ready on device: prepare_network), with
    the weight set named by weights (pick_weights). state: the file's contents, if already loaded."""
    required = ("model_config", "diffusion_config", "ema")
    state = load_checkpoint(path, required, flag) if state is None else check_keys(state, path, required, flag)
    if state.get("task") == "classifier":
        raise UsageError(f"{flag} {path}: this is a noisy classifier; pass it as --classifier_ckpt, with a "
                         "diffusion model as --ckpt")
    diffusion = GaussianDiffusion(**dict(state["diffusion_config"], **({"variance": variance} if variance else {})))
    model = build_model(state["model_config"])
    load_weights(model, pick_weights(state, path, weights), path, flag)
    return state, diffusion.to(device), prepare_network(model, device, amp)


def load_model_or_experts(paths, device, variance=None, weights="ema", first_state=None, amp="off"):
    """One --ckpt: load_diffusion_model. Several: expert denoisers (experts.py), each loaded the same way,
    checked to share the diffusion, image size and classes and to cover every t exactly once, and joined
    into one ExpertEnsemble(x_t, t, y) that every sampler can call. Returns (the first file's state, the
    diffusion, the model)."""
    loaded = [load_diffusion_model(path, "--ckpt", device, variance, weights, first_state if i == 0 else None, amp)
              for i, path in enumerate(paths)]
    state, diffusion, model = loaded[0]
    ranges = [expert_range(s) for s, _, _ in loaded]
    if len(paths) == 1:
        if ranges[0] != (0, diffusion.timesteps - 1):
            print(f"warning: {paths[0]} is an expert for t = {ranges[0][0]}..{ranges[0][1]} only (train.py --t_min/"
                  "--t_max); alone it serves every t. Pass the other experts with more --ckpt")
        return state, diffusion, model
    states = [s for s, _, _ in loaded]
    check_compatible(states, paths)
    check_coverage(ranges, diffusion.timesteps, paths)
    for path, (t_min, t_max), s in zip(paths, ranges, states):
        print(f"expert {path}: t = {t_min}..{t_max}, step {s.get('step')}")
    return state, diffusion, ExpertEnsemble([m for _, _, m in loaded], ranges).to(device).eval()


def sample_cold(args, path, state, device):
    """A Cold Diffusion checkpoint (cold.py): generate from random channel means (blur, pixelate, fade),
    or with --cold_restore degrade real images and restore them; either way with Algorithm 2 (improved)
    or 1 (naive). Gaussian-only flags are refused."""
    gaussian_only = [flag for flag, used in (
        ("--sampler ddim", args.sampler != "ddpm"), ("--steps", args.steps is not None), ("--eta", args.eta is not None),
        ("--guidance_scale", args.guidance_scale != 1.0), ("--classifier_ckpt", args.classifier_ckpt),
        ("--interpolate", args.interpolate), ("--invert", args.invert), ("--cond_images", args.cond_images),
        ("--sr_ckpt", args.sr_ckpt), ("--variance", args.variance), ("--no_clip", args.no_clip),
        ("--spacing", args.spacing != "uniform"), ("--upscale", args.upscale or args.upscale_mode)) if used]
    if gaussian_only:
        raise UsageError(f"{gaussian_only[0]}: belongs to Gaussian diffusion; {path} is a Cold Diffusion model "
                         "(its options: --cold_sampler, --cold_restore, --cold_level)")
    if args.cold_level is not None and not args.cold_restore:
        raise UsageError("--cold_level is the level --cold_restore degrades images to; generation runs every level "
                         "from T down: add --cold_restore PATH or leave out --cold_level")
    if args.cold_restore and (args.class_name or args.class_label):
        raise UsageError("--cold_restore reads each image's class from its folder; leave out --class_name/--class_label")
    check_counts(args)
    check_outputs(args)
    check_keys(state, path, ("model_config", "cold_config", "ema"))
    process = ColdDiffusion(**state["cold_config"]).to(device)
    model = build_model(state["model_config"])
    load_weights(model, pick_weights(state, path, args.weights), path)
    model = prepare_network(model, device, args.amp)
    size, channels = state["model_config"]["image_size"], state["model_config"]["in_channels"]
    class_names = state.get("class_names") or []
    print(f"{path}: step {state.get('step')}, {describe_weights(state, args.weights)}, {size}x{size}x{channels}, "
          f"{len(class_names) or 'no'} classes; {process.describe()}; sampler: {args.cold_sampler}")
    name = os.path.splitext(os.path.basename(path))[0] + ("" if args.weights == "ema" else f"_{args.weights}")
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    if args.cold_restore:
        if args.individual_dir or args.gif:
            raise UsageError("--cold_restore writes one grid of degraded / restored / original rows (--out); "
                             "leave out --individual_dir and --gif")
        if not os.path.exists(args.cold_restore):
            raise UsageError(f"--cold_restore {args.cold_restore}: no such file or folder")
        level = args.cold_level if args.cold_level is not None else max(1, process.timesteps // 2)
        if not 1 <= level <= process.timesteps:
            raise UsageError(f"--cold_level {level}: must be between 1 and the model's T = {process.timesteps}")
        images, labels = load_labelled_images(args.cold_restore, args.num_samples or 16, size, channels, class_names,
                                               "--cold_restore")
        original = to_model_range(images).to(device)
        levels = torch.full((len(original),), level, device=device, dtype=torch.long)
        degraded = process.degrade(original, levels)
        restored = process.sample(model, degraded, labels.to(device) if labels is not None else None,
                                  args.cold_sampler, steps=level)
        out_path = args.out or os.path.join("samples", f"{name}_restored.png")
        save_grid(from_model_range(torch.cat([degraded, restored, original])), out_path, nrow=len(images))
        print(f"{len(images)} images degraded to level {level} of {process.timesteps} and restored in "
              f"{time.perf_counter() - started:.1f} s: degraded / restored / original rows in {out_path}")
        return
    if class_names:  # one row per class, as for Gaussian models
        classes = choose_classes(args, class_names)
        labels, nrow = torch.tensor(classes).repeat_interleave(args.num_samples or 4), args.num_samples or 4
    elif args.class_name or args.class_label:
        raise UsageError(f"--class_name/--class_label: {path} is unconditional (it has no classes)")
    else:
        labels, nrow = None, None
    count = len(labels) if labels is not None else (args.num_samples or 16)
    images, trajectory = [], None
    for start in range(0, count, args.batch_size):
        b = min(args.batch_size, count - start)
        x_T = process.start_images(b, channels, generator, device)
        y = labels[start:start + b].to(device) if labels is not None else None
        every = max(1, process.timesteps // args.gif_frames) if (args.gif and trajectory is None) else 0
        out = process.sample(model, x_T, y, args.cold_sampler, trajectory_every=every)
        if every:
            out, trajectory = out
        images.append(from_model_range(out).cpu())
    images = torch.cat(images)
    out_path = args.out or os.path.join("samples", f"{name}.png")
    save_grid(images, out_path, nrow=nrow)
    calls = process.timesteps - (len(process.no_op_levels) if args.cold_sampler == "improved" else 0)  # cold.py
    print(f"grid of {len(images)} samples in {time.perf_counter() - started:.1f} s ({calls} network calls "
          f"each, {args.cold_sampler} sampler): {out_path}")
    if args.individual_dir:
        save_individual(images, args.individual_dir, [class_names[c] for c in labels.tolist()] if class_names else None)
    if args.gif:
        save_trajectory_gif(trajectory, args.gif)


def save_trajectory_gif(trajectory, path):
    """GIF of a reverse process: each frame x_t (left) beside the predicted x_0 (right), first 16 images."""
    frames = []
    for _, xt, pred_x0 in trajectory:
        left, right = make_grid_image(from_model_range(xt[:16])), make_grid_image(from_model_range(pred_x0[:16]))
        frame = Image.new(left.mode, (left.width + right.width + 8, left.height), 255)
        frame.paste(left, (0, 0))
        frame.paste(right, (left.width + 8, 0))
        frames.append(frame)
    save_gif(frames, path)
    print(f"reverse process, {len(frames)} frames: {path}")


def load_noisy_classifier(path, diffusion, class_names, device):
    """The classifier for classifier guidance, checked against the diffusion model it will steer."""
    state = load_checkpoint(path, required=("model_config", "diffusion_config", "ema", "class_names"),
                            flag="--classifier_ckpt")
    if state.get("task") != "classifier":
        raise UsageError(f"--classifier_ckpt {path}: not a classifier; train one with train.py --task classifier")
    saved = state["diffusion_config"]
    if (saved["timesteps"], saved["schedule"]) != (diffusion.timesteps, diffusion.schedule):
        raise UsageError(f"--classifier_ckpt {path}: trained on a T={saved['timesteps']} {saved['schedule']} "
                         f"schedule, but the model uses T={diffusion.timesteps} {diffusion.schedule}; the noise "
                         "levels must match, so train the classifier with the model's --timesteps and --schedule")
    if class_names and state["class_names"] != class_names:
        raise UsageError(f"--classifier_ckpt {path}: its classes differ from the model's; train both on the same folder")
    classifier = build_classifier(state["model_config"])
    load_weights(classifier, state["ema"], path, "--classifier_ckpt")
    return classifier.to(device).eval(), state["class_names"]


def choose_classes(args, class_names):
    """The class indices to draw, one grid row each: --class_name / --class_label, or every class
    (at most MAX_CLASS_ROWS). A wrong name gets the list of valid names."""
    if args.class_name:
        unknown = [n for n in args.class_name if n not in class_names]
        if unknown:
            shown = ", ".join(class_names[:30]) + (f", ... ({len(class_names)} in all)" if len(class_names) > 30 else "")
            raise UsageError(f"--class_name {unknown[0]}: not a class of this model; valid names: {shown}")
        return [class_names.index(n) for n in args.class_name]
    if args.class_label:
        bad = [c for c in args.class_label if not 0 <= c < len(class_names)]
        if bad:
            raise UsageError(f"--class_label {bad[0]}: this model has classes 0 .. {len(class_names) - 1}")
        return list(args.class_label)
    if len(class_names) > MAX_CLASS_ROWS:
        print(f"note: showing the first {MAX_CLASS_ROWS} of {len(class_names)} classes; pick others with --class_name")
    return list(range(min(len(class_names), MAX_CLASS_ROWS)))


def cond_image_paths(path, limit):
    """The image files of --cond_images (a file or a folder), at most limit."""
    if os.path.isfile(path) and not is_image_file(path):
        raise UsageError(f"--cond_images {path}: not an image file")
    paths = [path] if os.path.isfile(path) else list_images(path)
    if not paths:
        raise UsageError(f"--cond_images {path}: no images found in this folder")
    return readable_images(paths, limit, f"--cond_images {path}")


def readable_images(paths, limit, where):
    """The first `limit` of paths that decode, each broken one (truncated, not an image) skipped with a
    warning that names it, as training skips them; a one-line error when none does."""
    kept = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
            print(f"warning: skipping unreadable image {path}: {error}", file=sys.stderr)
            continue
        kept.append(path)
        if len(kept) == limit:
            break
    if not kept:
        raise UsageError(f"{where}: none of its {len(paths)} image files could be read; check them with "
                         "python tools/clean_dataset.py")
    return kept


def shorter_side(path):
    with Image.open(path) as img:
        return min(img.size)


def save_individual(images, folder, names=None):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, os.path.join(folder, f"sample_{i:05d}" + (f"_{names[i]}" if names else "") + ".png"))
    print(f"{len(images)} images: {folder}/")


def make_generate(args, diffusion, use_ddim, steps, eta):
    """generate(network, x_T, y, cond_fn, trajectory_every) for one diffusion (the base or the SR model):
    DDIM (eq. 12, eta as in eq. 16) or DDPM's Algorithm 2, respaced (Improved DDPM eq. 19) when steps < T.
    Predicted x_0 is clipped to [-1, 1] unless --no_clip, or clip=False (the inversion's decode)."""
    respaced = diffusion
    if not use_ddim and min(steps, diffusion.timesteps) < diffusion.timesteps:
        respaced = respace(diffusion, steps, args.spacing)  # Improved DDPM eq. 19

    def generate(network, noise, y=None, cond_fn=None, trajectory_every=0, clip=True):
        clip = clip and not args.no_clip
        if use_ddim:
            return ddim_sample(diffusion, network, noise.shape, min(steps, diffusion.timesteps), eta,
                               args.spacing, y, noise, clip_denoised=clip,
                               trajectory_every=trajectory_every, cond_fn=cond_fn)
        return respaced.sample(network, noise.shape, y, noise, clip_denoised=clip,
                               trajectory_every=trajectory_every, cond_fn=cond_fn)
    return generate


def guided_network(args, state, diffusion, model, class_names, device):
    """Guidance (guidance.py): classifier-free wraps the network; classifier guidance adds a cond_fn.
    Returns (network, cond_fn, class_names); an unconditional model steered by a classifier takes its names."""
    task = state.get("task", "diffusion")
    network, cond_fn = model, None
    if args.guidance_scale != 1.0:
        if not class_names or task != "diffusion":
            raise UsageError(f"--guidance_scale {args.guidance_scale:g}: {args.ckpt} is not class-conditional "
                             "(train on a folder with one subfolder per class); leave it at 1")
        if not state.get("p_uncond"):
            print("warning: this model was trained without label dropout (--p_uncond 0, or before it existed), "
                  "so its 'no label' prediction is untrained and guided samples will be poor")
        network = classifier_free_guidance(model, args.guidance_scale, len(class_names))
        print(f"classifier-free guidance: scale {args.guidance_scale:g} (1 = none; CFG paper's w = "
              f"{args.guidance_scale - 1:g}), one batched pass for both predictions")
    if args.classifier_ckpt:
        if task != "diffusion":
            raise UsageError("--classifier_ckpt: guidance needs a --ckpt that draws samples (task diffusion)")
        classifier, classifier_names = load_noisy_classifier(args.classifier_ckpt, diffusion, class_names, device)
        class_names = class_names or classifier_names
        cond_fn = classifier_guidance(classifier, args.classifier_scale)
        print(f"classifier guidance: scale {args.classifier_scale:g} with {args.classifier_ckpt}")
    return network, cond_fn, class_names


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    requested, args.amp = args.amp, resolve_amp(args.amp, device)
    refuse_fp16_on_cpu(args.amp, device)  # now, before a note that the network runs in fp16
    if requested != "off":
        print(f"--amp {requested}: " + (f"the network in {args.amp} autocast, the sampler's arithmetic in fp32"
                                         if args.amp != "off" else "fp32 (no bf16 matrix hardware on this CPU)"))
    if note := emulated_bf16_note(requested, args.amp, device):
        print(note)
    paths = args.ckpt
    first = load_checkpoint(paths[0], required=())
    if isinstance(first, dict) and first.get("process") == "cold":
        if len(paths) > 1:
            raise UsageError("--ckpt: one Cold Diffusion checkpoint at a time (expert ensembles are for Gaussian models)")
        return sample_cold(args, paths[0], first, device)
    if args.cold_restore or args.cold_level is not None or args.cold_sampler != "improved":
        raise UsageError("--cold_sampler/--cold_restore/--cold_level: for Cold Diffusion checkpoints "
                         "(train.py --process cold)")
    args.ckpt = " + ".join(paths)  # for the messages below
    state, diffusion, model = load_model_or_experts(paths, device, args.variance, args.weights, first, args.amp)
    check_args(args, diffusion.timesteps)
    task = state.get("task", "diffusion")
    class_names = state.get("class_names") or []
    size, channels = state["model_config"]["image_size"], state["model_config"]["in_channels"]
    print(f"{args.ckpt}: {task} model, step {state.get('step')}, {describe_weights(state, args.weights)}, "
          f"{size}x{size}x{channels}, {len(class_names) or 'no'} classes; {diffusion.describe()}")

    # Which sampler, with how many network calls per image.
    use_ddim = args.sampler == "ddim" or bool(args.interpolate or args.invert)
    steps = args.steps or (min(50, diffusion.timesteps) if use_ddim else diffusion.timesteps)
    eta = args.eta or 0.0
    print(f"sampler: {'DDIM eta=' + format(eta, 'g') if use_ddim else 'DDPM (Algorithm 2)'}, "
          f"{steps} of {diffusion.timesteps} steps ({args.spacing} spacing)")
    generate = make_generate(args, diffusion, use_ddim, steps, eta)
    network, cond_fn, class_names = guided_network(args, state, diffusion, model, class_names, device)
    if task == "diffusion" and args.cond_images:
        raise UsageError(f"--cond_images: {args.ckpt} draws from noise and takes no input images; --cond_images is "
                         "for super_resolution and image_to_image models (to encode images into x_T, use --invert)")
    if task in ("super_resolution", "image_to_image") and (args.class_name or args.class_label or args.gif
                                                          or args.interpolate or args.invert):
        raise UsageError(f"--ckpt {args.ckpt}: a {task} model's outputs follow --cond_images; leave out "
                         "--class_name, --class_label, --gif, --interpolate and --invert")
    # The cascade's SR model, checked before the long sampling.
    sr = load_sr_model(args, channels, size, device) if args.sr_ckpt else None
    # Seeded once every network is built: building one (a classifier, the SR model) draws its initial
    # weights from the same generator, so seeding earlier made --classifier_ckpt or --sr_ckpt change x_T.
    seed_everything(args.seed)

    def decode(noise, labels, cond=None, cond_t=None, clip=True):
        """Decode x_T [N x C x S x S] batch by batch (with labels [N] and conditioning images [N x ...]);
        returns uint8 images."""
        out = []
        for start in range(0, len(noise), args.batch_size):
            part = slice(start, start + args.batch_size)
            y = labels[part].to(device) if labels is not None else None
            net = network
            if cond is not None:
                net = cascade.conditioned(model, cond[part].to(device), cond_t[part].to(device) if cond_t is not None else None)
            out.append(from_model_range(generate(net, noise[part].to(device), y, cond_fn=cond_fn, clip=clip)).cpu())
        return torch.cat(out)

    name = os.path.splitext(os.path.basename(paths[0]))[0] + ("_experts" if len(paths) > 1 else "")
    name += "" if args.weights == "ema" else f"_{args.weights}"  # samples/cars_ema_swa.png beside cars_ema.png
    # What to make: one of four modes, each a function below.
    if task in ("super_resolution", "image_to_image"):
        return outputs_for_images(args, state, diffusion, decode, name, device)
    if args.interpolate:
        return interpolation_grid(args, decode, class_names, size, channels, name)
    if args.invert:
        return inversion_grid(args, state, diffusion, network, decode, steps, name, device)
    images, out_path, nrow = sample_images(args, generate, network, cond_fn, class_names, size, channels,
                                           steps, name, device)
    if args.sr_ckpt or args.upscale or args.upscale_mode:
        sr_generate = None
        if sr:  # the SR model's own T unless --steps is given (checked against it in load_sr_model)
            sr_steps = args.steps or (min(50, sr[1].timesteps) if use_ddim else sr[1].timesteps)
            print(f"SR stage: {sr_steps} of {sr[1].timesteps} steps")
            sr_generate = make_generate(args, sr[1], use_ddim, sr_steps, eta)
        upscale_samples(args, images, out_path, nrow, sr, sr_generate)


def outputs_for_images(args, state, diffusion, decode, name, device):
    """An image-conditioned model (super-resolution or image-to-image): its outputs for --cond_images,
    saved as a grid with the inputs above them."""
    task = state.get("task")
    size, channels = state["model_config"]["image_size"], state["model_config"]["in_channels"]
    if not args.cond_images:
        raise UsageError(f"--ckpt {args.ckpt}: a --task {task} model needs input images; give --cond_images PATH"
                         + (" (or use it as --sr_ckpt after a base model)" if task == "super_resolution" else ""))
    started = time.perf_counter()
    settings = state.get("conditioning") or {}
    paths = cond_image_paths(args.cond_images, args.num_samples or 16)
    if task == "super_resolution":
        low_res = settings["low_res"]
        low = torch.stack([load_image(p, low_res, channels) for p in paths])
        cond, cond_t = cascade.sr_condition(diffusion, to_model_range(low).to(device), size,
                                            cascade.sampling_level(settings))
    else:
        low = torch.stack([load_image(p, size, state["model_config"]["cond_channels"]) for p in paths])
        cond, cond_t = to_model_range(low).to(device), None
    images = decode(torch.randn(len(low), channels, size, size), None, cond, cond_t)
    shown = resize_uint8(low, size, "nearest")
    if shown.shape[1] != channels:  # a grayscale input beside colour outputs, or the reverse
        shown = shown.float().mean(1, keepdim=True).round().to(torch.uint8).expand(-1, channels, -1, -1)
    groups, what = [shown, images], "inputs above outputs"
    if task == "super_resolution":
        # Compare with plain bicubic upsampling, and with the originals when they are big enough to
        # hold the detail (then the input is a shrunk copy, and the last row is the truth).
        groups.insert(1, from_model_range(cascade.upsample(to_model_range(low), size)))
        what = "rows: input (nearest), bicubic, SR model"
        if all(shorter_side(p) >= size for p in paths):
            groups.append(torch.stack([load_image(p, size, channels) for p in paths]))
            what += f", original at {size}x{size}"
            # PSNR = 10 log10(255^2 / mean squared error) against the originals. A diffusion SR model
            # invents plausible detail rather than the average guess, so it may look sharper and
            # still score below bicubic: PSNR rewards blur (SR3 discusses this).
            psnr = [10 * torch.log10(255.0 ** 2 / (g.float() - groups[-1].float()).pow(2).mean()).item()
                    for g in groups[1:3]]
            print(f"PSNR against the originals: bicubic {psnr[0]:.2f} dB, SR model {psnr[1]:.2f} dB")
    out_path = args.out or os.path.join("samples", f"{name}_outputs.png")
    save_grid(stacked_rows(groups, min(len(low), 8)), out_path, nrow=min(len(low), 8))
    print(f"{len(low)} inputs -> outputs in {time.perf_counter() - started:.1f} s; {what}: {out_path}")
    if args.individual_dir:
        save_individual(images, args.individual_dir)


def interpolation_grid(args, decode, class_names, size, channels, name):
    """--interpolate N: each row is two random x_T and the slerp between them (ddim.interpolation_noise;
    DDIM's interpolation experiment, section number unverified), every point decoded by DDIM with eta 0."""
    started = time.perf_counter()
    rows = args.num_samples or 4
    ends = torch.randn(rows, 2, channels, size, size)
    noise = torch.cat([interpolation_noise(ends[r, 0], ends[r, 1], args.interpolate) for r in range(rows)])
    labels = (torch.arange(rows).repeat_interleave(args.interpolate) % len(class_names)) if class_names else None
    images = decode(noise, labels)
    out_path = args.out or os.path.join("samples", f"{name}_interpolation.png")
    save_grid(images, out_path, nrow=args.interpolate)
    print(f"{rows} interpolation rows of {args.interpolate} in {time.perf_counter() - started:.1f} s: {out_path}")


def inversion_grid(args, state, diffusion, network, decode, steps, name, device):
    """--invert PATH: encode real images to x_T by DDIM eq. 12 with sigma = 0 run forwards in t
    (ddim.ddim_invert), decode them back, and save originals above reconstructions with the mean
    absolute error of the round trip."""
    started = time.perf_counter()
    size, channels = state["model_config"]["image_size"], state["model_config"]["in_channels"]
    originals, labels = load_labelled_images(args.invert, args.num_samples or 16, size, channels,
                                              state.get("class_names") or [])
    x0 = to_model_range(originals)
    latents = []
    for start in range(0, len(x0), args.batch_size):
        y = labels[start:start + args.batch_size].to(device) if labels is not None else None
        latents.append(ddim_invert(diffusion, network, x0[start:start + args.batch_size].to(device), steps,
                                   args.spacing, y).cpu())
    latents = torch.cat(latents)
    # Decode without clipping: inversion did not clip, and the round trip should retrace the same path.
    reconstructions = decode(latents, labels, clip=False)
    error = (to_model_range(reconstructions) - x0).abs().mean().item()
    out_path = args.out or os.path.join("samples", f"{name}_inversion.png")
    # Rows of up to 8 originals, each above its reconstructions.
    nrow = min(len(originals), 8)
    save_grid(stacked_rows([originals, reconstructions], nrow), out_path, nrow=nrow)
    print(f"{len(x0)} images -> x_T -> images in {time.perf_counter() - started:.1f} s, mean absolute error "
          f"{error:.4f} on [-1, 1]; originals above reconstructions: {out_path}")


def sample_images(args, generate, network, cond_fn, class_names, size, channels, steps, name, device):
    """New samples from x_T ~ N(0, I), saved as a grid (and as files, and the reverse process as a GIF,
    when asked). A class-conditional (or classifier-guided) model draws one row per chosen class.
    Returns (uint8 images [N x C x S x S], the grid's path, images per row)."""
    started = time.perf_counter()
    if class_names:
        classes = choose_classes(args, class_names)
        per_class = args.num_samples or 4
        all_labels = torch.tensor(classes).repeat_interleave(per_class)
        nrow = per_class
        print(f"classes, one row each: {', '.join(class_names[c] for c in classes)}")
    else:
        if args.class_name or args.class_label:
            raise UsageError(f"--class_name/--class_label: {args.ckpt} is unconditional (it has no classes)")
        all_labels, nrow = None, None
    num_samples = len(all_labels) if all_labels is not None else (args.num_samples or 16)
    images, trajectory = [], None
    for start in range(0, num_samples, args.batch_size):
        b = min(args.batch_size, num_samples - start)
        y = all_labels[start:start + b].to(device) if all_labels is not None else None
        every = max(1, steps // args.gif_frames) if (args.gif and trajectory is None) else 0
        out = generate(network, torch.randn(b, channels, size, size, device=device), y, cond_fn=cond_fn,
                       trajectory_every=every)
        if every:
            out, trajectory = out
        images.append(from_model_range(out).cpu())
        print(f"sampled {start + b}/{num_samples}")
    images = torch.cat(images)  # uint8 [N x C x S x S]
    elapsed = time.perf_counter() - started

    out_path = args.out or os.path.join("samples", f"{name}.png")
    save_grid(images, out_path, nrow=nrow)
    print(f"grid of {len(images)} samples in {elapsed:.1f} s ({steps} network calls each): {out_path}")
    names = [class_names[c] for c in all_labels.tolist()] if all_labels is not None else None
    if args.individual_dir:
        save_individual(images, args.individual_dir, names)
    if args.gif:
        save_trajectory_gif(trajectory, args.gif)
    return images, out_path, nrow


def load_sr_model(args, channels, size, device):
    """The --sr_ckpt of a cascade, checked before any sampling: (state, diffusion, model). size: the base
    model's samples, which the cascade enlarges to the SR model's output size."""
    state, sr_diffusion, sr_model = load_diffusion_model(args.sr_ckpt, "--sr_ckpt", device, amp=args.amp)
    if state.get("task") != "super_resolution":
        raise UsageError(f"--sr_ckpt {args.sr_ckpt}: not a super-resolution model (train.py --task super_resolution)")
    out_size = state["model_config"]["image_size"]
    if args.upscale and args.upscale * size != out_size:  # the base samples' enlargement, whatever low_res is
        raise UsageError(f"--upscale {args.upscale}: this cascade turns the {size}x{size} samples into "
                         f"{out_size}x{out_size} (x{out_size / size:g}); leave out --upscale")
    if args.steps is not None and args.steps > sr_diffusion.timesteps:
        raise UsageError(f"--steps {args.steps}: the SR model has T = {sr_diffusion.timesteps}; give at most that")
    if state["model_config"]["in_channels"] != channels:
        raise UsageError(f"--sr_ckpt {args.sr_ckpt}: made for {state['model_config']['in_channels']}-channel "
                         f"images, the base model's have {channels}")
    return state, sr_diffusion, sr_model


def upscale_samples(args, images, grid_path, nrow, sr, sr_generate):
    """--sr_ckpt / --upscale: enlarge the samples and save them beside their grid as <grid>_x<F>.png.
    'sr' is the cascade of Ho et al. 2021: the SR model's outputs conditioned on the base samples."""
    mode = args.upscale_mode or ("sr" if args.sr_ckpt else "bicubic")
    size = images.shape[-1]
    started = time.perf_counter()
    if mode == "sr":
        state, sr_diffusion, sr_model = sr
        settings = state["conditioning"]
        low_res, out_size = settings["low_res"], state["model_config"]["image_size"]
        if size != low_res:
            print(f"note: resizing the {size}x{size} samples to the SR model's input, {low_res}x{low_res}")
        low = to_model_range(resize_uint8(images, low_res, "bicubic") if size != low_res else images)
        upscaled = from_model_range(cascade.cascade_upscale(sr_diffusion, sr_model, settings, low, out_size,
                                                            sr_generate, args.batch_size))
        factor = out_size // size
        how = f"the SR model {args.sr_ckpt} (conditioning augmentation level {cascade.sampling_level(settings)})"
    elif mode == "realesrgan":
        from realesrgan import SCALE, load_realesrgan, realesrgan_upscale
        factor = args.upscale or SCALE
        upscaled = realesrgan_upscale(load_realesrgan(args.realesrgan_weights).to(pick_device(args.device)), images)
        if factor != SCALE:  # the network is x4; other factors resize its output, as Real-ESRGAN's --outscale does
            upscaled = resize_uint8(upscaled, size * factor, "bicubic")
        how = "Real-ESRGAN (RealESRGAN_x4plus)"
    else:
        factor = args.upscale or 4
        upscaled = resize_uint8(images, size * factor, mode)
        how = f"{mode} interpolation"
    out_path = f"{os.path.splitext(grid_path)[0]}_x{factor}.png"
    save_grid(upscaled, out_path, nrow=nrow)
    print(f"upscaled x{factor} to {upscaled.shape[-1]}x{upscaled.shape[-1]} by {how} in "
          f"{time.perf_counter() - started:.1f} s: {out_path}")
    if args.individual_dir:
        save_individual(upscaled, os.path.join(args.individual_dir, f"x{factor}"))


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background by a shell script:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C (SIGINT) stops it all the same
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from deep inside the network
        print("\ninterrupted; nothing more is written (files saved before now are kept)", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as error:  # out of memory: one line with the flag that helps, not a traceback
        if (message := out_of_memory(error, "lower --batch_size, or try --amp")) is None:
            raise
        sys.exit(f"error: {message}")
