"""
Time to quality: how good the samples are after how many minutes of training, for our runs and for
the peers, scored the same way. What a user feels is the minutes until the samples look right.

    python train.py --dataset_path data/mnist.npz ... --max_minutes 20 --save_every 500 --keep_last 100
    python tools/time_to_quality.py --ckpt checkpoints/mnist_ema_step*.pt \
        --peer lucidrains=peer_lucid.npz --peer diffusers=peer_diffusers.npz \
        --classifier checkpoints/mnist_eval_classifier.pt --reference_path data/mnist_test \
        --csv images/mnist_time_to_quality.csv --plot images/mnist_time_to_quality.png --grids images/ttq

Each --ckpt is one point: its training minutes come from the checkpoint itself (train.py stores the
seconds spent in training steps, train_seconds, in every checkpoint; since 2026-11-29 without the time
of sample grids and saving, which older checkpoints include; --keep_last keeps a numbered one at every
--save_every). --num_samples images are drawn from each with DDIM (Song et al. 2020, eq. 12,
eta 0; ddim.py) in --steps steps. A class-conditional model gets labels drawn at random, uniformly
(seeded), so that its samples are a draw from p(x) = sum_y p(y) p(x | y) like an unconditional
model's; --labels none instead gives every sample the "no label" input, which a model trained with
label dropout (--p_uncond, the default 0.1) learned as its unconditional model: the fair comparison
with unconditional peers. Each --peer is NAME=an .npz written by ../shared/bench/quality_peers.py: uint8 digits x
[N x 28 x 28] and the seconds it trained, train_s. The digits are brought to the classifier's size the
way the reference folder's 28x28 images are read (utils.fit_images: resized, 28 -> 32), so that they
are compared like with like; padding them instead would draw every digit smaller than the reference's,
which by itself puts real test digits far from the reference (README: Time to quality).

Every set is scored by the offline classifier of tools/classifier.py: the Frechet distance of its
features to the held-out images ("FD": --num_reference + --num_samples are drawn from
--reference_path, and those left after the floor's --num_samples below are the reference; fewer when
the folder holds fewer, and the count is printed; the FID recipe with that classifier in place of
Inception; lower is better; comparable only at equal image counts), the fraction of samples
classified as the label asked for (conditional models), and the share of the rarest class among the
classifier's predictions ("rarest class": 0.1 when all ten digits are equally common, 0 when one is
missing). The first row, "real", is --num_samples held-out images scored the same way: FD's floor
for that many images. The real and peer rows leave sampler and steps empty: the peers sample their
own way (quality_peers.py), and every set is scored at the same count.
"""
import argparse
import os
import sys
import zipfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from classifier import features_and_logits, feature_statistics, frechet_distance, load_classifier, load_folder  # noqa: E402
from ddpm import GaussianDiffusion  # noqa: E402
from model import build_model  # noqa: E402
from sampler_sweep import (PLOT_SUFFIXES, check_classifier_fits, check_reference_classes, check_whole_model,  # noqa: E402
                           draw_samples)
from utils import (UsageError, append_csv_rows, check_csv_table, check_output_file, check_output_folder,  # noqa: E402
                   emulated_bf16_note, fit_images, keep_freed_memory, load_checkpoint, load_weights, pick_device,
                   prepare_network, resolve_amp, save_grid)

FIELDS = ["run", "minutes", "step", "num_samples", "sampler", "steps", "fd", "class_accuracy", "rarest_class",
          "sample_seconds", "source"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample quality against training minutes, ours and the peers'.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", nargs="+", default=[], help="EMA checkpoints of one run (train.py, any steps)")
    p.add_argument("--run_name", default="ours", help="the name of the --ckpt run in the table and plot")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=PATH",
                   help="samples of a peer: an .npz from ../shared/bench/quality_peers.py (repeatable)")
    p.add_argument("--classifier", required=True, help="checkpoint written by tools/classifier.py")
    p.add_argument("--reference_path", required=True, help="held-out real images (class subfolders)")
    p.add_argument("--num_reference", type=int, default=10000, help="reference images for the statistics")
    p.add_argument("--num_samples", type=int, default=1000, help="samples drawn from each checkpoint")
    p.add_argument("--labels", default="random", choices=("random", "none"),
                   help="class-conditional checkpoints: random uniform labels, or none (the 'no label' input)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", required=True, help="rows are appended here")
    p.add_argument("--plot", default=None, help="PNG of FD against training minutes, from the whole CSV")
    p.add_argument("--grids", default=None, help="folder for a 10x10 grid of each set's first 100 samples")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="off", choices=("off", "auto", "bf16", "fp16"),
                   help="the network in bf16/fp16 autocast as sample.py --amp runs it; the rows' sampler says so")
    return p.parse_args(argv)


def read_peer(spec, size, channels):
    """NAME=PATH -> (name, uint8 images [N x C x size x size], training seconds, training steps), checked."""
    name, _, path = spec.partition("=")
    if not name or not path:
        raise UsageError(f"--peer {spec}: expected NAME=PATH, e.g. lucidrains=peer_lucid.npz")
    if not os.path.isfile(path):
        raise UsageError(f"--peer {spec}: no such file {path}; make it with ../shared/bench/quality_peers.py")
    try:
        with np.load(path) as data:
            if "x" not in data or data["x"].dtype != np.uint8:
                raise UsageError(f"--peer {spec}: expected a uint8 array x, as quality_peers.py writes")
            images, seconds = data["x"], float(data["train_s"]) if "train_s" in data else float("nan")
            steps = int(data["steps"]) if "steps" in data else 0
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # not an .npz, or cut short
        raise UsageError(f"--peer {spec}: cannot read {path} as an .npz ({type(error).__name__}); write it "
                         "again with quality_peers.py") from None
    # uint8 [N x H x W] or [N x H x W x C] with C = 1 to 4 (grey, grey + alpha, RGB, RGBA), as fit_images reads
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 2, 3, 4)) or not len(images):
        raise UsageError(f"--peer {spec}: x has shape {images.shape}; expected images [N x H x W] or "
                         "[N x H x W x C] with C = 1 to 4, as quality_peers.py writes")
    images = fit_images(images, size, desc=f"reading {path}")  # as the reference folder's images are read
    if images.shape[1] != channels:
        raise UsageError(f"--peer {spec}: {images.shape[1]}-channel images; the classifier takes {channels}")
    return name, images, seconds, steps


def rarest_class_share(logits, num_classes):
    """The share of the least frequent class among the classifier's predictions (1/K when balanced)."""
    counts = torch.bincount(logits.argmax(1).cpu(), minlength=num_classes)
    return (counts.min() / counts.sum()).item()


def check_checkpoint(path, args, classifier_state):
    """One --ckpt checked for everything main needs of it (readable, a time on the axis, a whole model the
    classifier fits, --steps and --labels that suit it) -> its contents. main checks every checkpoint so
    before it samples the first: the last of twenty would otherwise fail after nineteen were scored."""
    state = load_checkpoint(path, required=("model_config", "diffusion_config", "ema"), task="diffusion")
    if "train_seconds" not in state:
        raise UsageError(f"--ckpt {path}: it does not record its training time (train_seconds); it was "
                         "written before train.py stored it, so it has no place on a time axis")
    check_whole_model(state, path)
    check_classifier_fits(classifier_state, state["model_config"], state.get("class_names") or [],
                          f"--classifier {args.classifier}")
    if not 1 <= args.steps <= state["diffusion_config"]["timesteps"]:
        raise UsageError(f"--steps {args.steps}: must be between 1 and the model's T "
                         f"({state['diffusion_config']['timesteps']} in {path})")
    if state.get("class_names") and args.labels == "none" and not state.get("p_uncond"):
        raise UsageError(f"--ckpt {path}: --labels none needs a model trained with label dropout (--p_uncond > 0)")
    return state


def plot(csv_path, png_path):
    """FD against training minutes: a line per run of checkpoints, a point per peer, real images dashed."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = sorted((float(r["minutes"]), float(r["fd"])) for r in rows if r["run"] == run)
        if run == "real":
            floor = min((r for r in rows if r["run"] == "real"), key=lambda r: float(r["fd"]))
            ax.axhline(float(floor["fd"]), color="gray", linestyle="--", label=f"real test images ({floor['num_samples']})")
        else:
            ax.plot(*zip(*mine), marker="o" if len(mine) > 1 else "s", markersize=5 if len(mine) > 1 else 9,
                    label=run)
    ax.set_yscale("log")
    ax.set_xlabel("training minutes (train.py's train_seconds)")
    ax.set_ylabel("FD of classifier features (log scale; lower is better)")
    ours = [r for r in rows if r["sampler"]] or rows  # the real and peer rows name no sampler
    sampler = (ours[-1]["sampler"].split() or ["?"])[0].upper()  # "ddim (bf16)" -> "DDIM"
    ax.set_title(f"Time to quality: {ours[-1]['num_samples']} samples each, {sampler} {ours[-1]['steps']} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if not args.ckpt and not args.peer:
        raise UsageError("nothing to score: pass --ckpt checkpoints and/or --peer NAME=PATH")
    if args.num_samples < 2 or args.batch_size < 1:
        raise UsageError(f"--num_samples {args.num_samples}, --batch_size {args.batch_size}: need at least 2 and 1")
    check_csv_table(args.csv, FIELDS)  # now, not after the sampling
    if args.plot:
        check_output_file(args.plot, "--plot", PLOT_SUFFIXES)
    if args.grids:
        check_output_folder(args.grids, "--grids")
    keep_freed_memory()
    device = pick_device(args.device)
    amp = resolve_amp(args.amp, device)
    if note := emulated_bf16_note(args.amp, amp, device):
        print(note)
    sampler_name = args.sampler + (f" ({amp})" if amp != "off" else "")
    classifier, classifier_state = load_classifier(args.classifier)
    classifier = classifier.to(device)
    size, channels = classifier_state["config"]["image_size"], classifier_state["config"]["channels"]
    num_classes = len(classifier_state["class_names"])
    for path in args.ckpt:  # every checkpoint, before the first is sampled
        check_checkpoint(path, args, classifier_state)
    peers = [read_peer(spec, size, channels) for spec in args.peer]  # checked before the long sampling
    for spec, (_, images, _, _) in zip(args.peer, peers):
        if len(images) < args.num_samples:  # FD grows as the count falls: only equal counts compare
            raise UsageError(f"--peer {spec}: {len(images)} images, fewer than --num_samples {args.num_samples}; "
                             "draw more with quality_peers.py or lower --num_samples")
    # One random draw of real images: the first num_samples are scored like samples (the floor), the rest
    # give the reference statistics.
    real, real_labels, real_classes = load_folder(args.reference_path, size, channels,
                                                  args.num_reference + args.num_samples, seed=args.seed,
                                                  flag="--reference_path")
    check_reference_classes(real_classes, classifier_state["class_names"], f"--reference_path {args.reference_path}")
    if len(real) < 2 * args.num_samples:
        raise UsageError(f"--reference_path {args.reference_path}: {len(real)} images; need at least twice "
                         f"--num_samples ({2 * args.num_samples})")
    ref_features, _ = features_and_logits(classifier, real[args.num_samples:], device=device)
    ref_mu, ref_sigma = feature_statistics(ref_features)
    print(f"reference: {len(real) - args.num_samples} images from {args.reference_path}")

    rows = []

    def score(run, images, minutes, step, labels=None, seconds=0.0, source="", sampler="", steps=""):
        features, logits = features_and_logits(classifier, images, device=device)
        fd = frechet_distance(*feature_statistics(features), ref_mu, ref_sigma)
        accuracy = (logits.argmax(1).cpu() == labels).float().mean().item() if labels is not None else float("nan")
        rarest = rarest_class_share(logits, num_classes)
        rows.append(dict(run=run, minutes=f"{minutes:.2f}", step=step, num_samples=len(images), sampler=sampler,
                         steps=steps, fd=f"{fd:.3f}", class_accuracy=f"{accuracy:.4f}",
                         rarest_class=f"{rarest:.3f}", sample_seconds=f"{seconds:.1f}", source=source))
        print(f"{run} at {minutes:.1f} min (step {step}): FD {fd:.3f}, class accuracy {accuracy:.4f}, "
              f"rarest class {rarest:.3f} ({seconds:.0f} s to sample)", flush=True)
        if args.grids:
            save_grid(images[:100], os.path.join(args.grids, f"{run}_{step}.png"), nrow=10)

    score("real", real[:args.num_samples], 0.0, 0, real_labels[:args.num_samples], source=args.reference_path)
    generator = torch.Generator().manual_seed(args.seed)
    for path in args.ckpt:
        state = check_checkpoint(path, args, classifier_state)  # checked above; read again, one at a time
        config, class_names = state["model_config"], state.get("class_names") or []
        model = build_model(config)
        load_weights(model, state["ema"], path)
        model = prepare_network(model, device, amp)  # as sample.py runs it: layout, autocast
        diffusion = GaussianDiffusion(**state["diffusion_config"]).to(device)
        noise = torch.randn(args.num_samples, channels, size, size, generator=generator.manual_seed(args.seed))
        labels = None  # unconditional, or a conditional model's "no label" input (model.py)
        if class_names and args.labels == "random":
            labels = torch.randint(0, len(class_names), (args.num_samples,), generator=generator)
        images, seconds = draw_samples(diffusion, model, args.sampler, args.steps, noise, labels, args.batch_size,
                                       args.seed)
        score(args.run_name, images, state["train_seconds"] / 60, state["step"], labels, seconds, path, sampler_name,
              args.steps)
    for spec, (name, images, train_seconds, steps) in zip(args.peer, peers):
        score(name, images[:args.num_samples], train_seconds / 60, steps, source=spec.partition("=")[2])

    append_csv_rows(args.csv, FIELDS, rows)
    print(f"{len(rows)} rows appended to {args.csv}")
    if args.plot:
        plot(args.csv, args.plot)
        print(f"plot: {args.plot}")
    return rows


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
