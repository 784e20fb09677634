"""
Sample quality and wall time against the number of sampling steps, for DDPM (Algorithm 2, respaced
by Improved DDPM eq. 19 below T steps) and DDIM (eq. 12), measured with the offline classifier of
tools/classifier.py: the Frechet distance of its features to a reference folder ("FD", lower is
better) and, for class-conditional models, the fraction of samples classified as the class asked for.

    python tools/sampler_sweep.py --ckpt checkpoints/mnist_ema.pt --classifier checkpoints/mnist_eval_classifier.pt \
        --reference_path data/mnist_test --samplers ddpm ddim --steps 10 20 50 100 1000 --num_samples 200 \
        --csv images/mnist_steps.csv --plot images/mnist_steps.png

Rows are appended to --csv (so several checkpoints can share one table and plot); --plot redraws the
figure from every row of the CSV. Every setting draws the same starting noise (--seed). The first
row of each run is "real": --num_samples held-out reference images scored like samples, which is the
floor the FD of that many images can reach (FD is biased upwards for small sets). For a class-conditional
model the floor has the samples' class proportions (as many images of each class as samples asked for it),
so a sampler is not credited or blamed for the luck of a random draw's proportions.
"""
import argparse
import csv
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from classifier import features_and_logits, feature_statistics, frechet_distance, load_classifier, load_folder  # noqa: E402
from ddim import SPACINGS, check_eta, ddim_sample  # noqa: E402
from ddpm import GaussianDiffusion  # noqa: E402
from experts import expert_range  # noqa: E402
from improved_ddpm import respace  # noqa: E402
from model import build_model  # noqa: E402
from utils import (UsageError, append_csv_rows, check_csv_table, check_output_file, check_output_folder,  # noqa: E402
                   emulated_bf16_note, from_model_range, load_checkpoint, load_weights, pick_device, prepare_network,
                   resolve_amp, save_grid, save_image)

FIELDS = ["run", "sampler", "steps", "num_samples", "fd", "class_accuracy", "seconds", "device"]
PLOT_SUFFIXES = (".png", ".pdf", ".svg")  # what --plot may be named: matplotlib picks the format from the name
SAMPLE_FILE = re.compile(r"\d{5,}\.png")  # the files save_sample_folder writes: 00000.png, 00001.png, ...


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample quality and time against sampling steps.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="diffusion checkpoint written by train.py")
    p.add_argument("--classifier", required=True, help="checkpoint written by tools/classifier.py")
    p.add_argument("--reference_path", required=True, help="held-out real images (class subfolders)")
    p.add_argument("--num_reference", type=int, default=10000, help="reference images for the statistics (0 = all)")
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"], choices=("ddpm", "ddim"))
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
    p.add_argument("--eta", type=float, nargs="+", default=[0.0],
                   help="DDIM rows only: the noise scale of DDIM eq. 16, 0 (deterministic) to 1 (DDPM-like); "
                        "one row each")
    p.add_argument("--spacing", nargs="+", default=["uniform"], choices=SPACINGS,
                   help="DDIM rows only: the sub-sequence of steps (ddim.ddim_timesteps); one row each")
    p.add_argument("--num_samples", type=int, default=200, help="samples per setting")
    p.add_argument("--batch_size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run_name", default=None, help="label in the table; default: the checkpoint's file name")
    p.add_argument("--csv", required=True, help="results are appended here")
    p.add_argument("--plot", default=None, help="PNG redrawn from the whole CSV")
    p.add_argument("--grids", default=None, help="folder for one sample grid per setting (first 64 samples)")
    p.add_argument("--save_samples", default=None, metavar="DIR",
                   help="also write every sample as a PNG, into DIR/<run>_<sampler>_<steps>/<class>/, the layout "
                   "tools/evaluate.py --samples reads (to score a costly draw again, e.g. with KID), and the "
                   "floor's real images into DIR/<run>_real/; a rerun replaces each of those folders' earlier draw")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="off", choices=("off", "auto", "bf16", "fp16"),
                   help="the network in bf16/fp16 autocast as sample.py --amp runs it; the rows' sampler names "
                   "say so, e.g. 'ddim (bf16)'")
    return p.parse_args(argv)


def draw_samples(diffusion, model, sampler, steps, noise, labels=None, batch_size=200, seed=0, eta=0.0,
                 spacing="uniform"):
    """Samples from the starting noise x_T [N x C x H x W] (labels [N] or None) with DDPM (Algorithm 2,
    respaced to `steps` by Improved DDPM eq. 19 when steps < T) or DDIM (eq. 12 with this eta and spacing)
    -> (uint8 images, seconds).
    Seeds torch's global generator first, so every setting sees the same per-step noise z. Not with `seed`
    itself: the tools draw x_T from a generator seeded with `seed`, and the same seed would make the first
    batch's first z equal to its x_T (noise added along the starting point instead of independently)."""
    device = diffusion.betas.device
    torch.manual_seed(seed + 1)
    respaced = respace(diffusion, steps) if sampler == "ddpm" and steps < diffusion.timesteps else diffusion
    started = time.perf_counter()
    images = []
    for start in range(0, len(noise), batch_size):
        x_T = noise[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        if sampler == "ddim":
            out = ddim_sample(diffusion, model, x_T.shape, steps, eta, spacing, y, x_T)
        else:
            out = respaced.sample(model, x_T.shape, y, x_T)
        images.append(from_model_range(out))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(images), time.perf_counter() - started


def split_floor_and_reference(real_labels, num_samples, sample_labels=None, flag="--reference_path"):
    """(floor indices, reference indices) into the shuffled real images, disjoint: the floor is scored like
    the samples, the reference gives the statistics everything is compared with.
    Unconditional (sample_labels None): the first num_samples images. Class-conditional (sample_labels
    int64 [num_samples]): for each class, the first real images of that class, as many as there are
    samples of it, so floor and samples have the same class proportions. The rest is the reference."""
    if sample_labels is None:
        everything = torch.arange(len(real_labels))
        return everything[:num_samples], everything[num_samples:]
    floor = []
    for c, wanted in enumerate(torch.bincount(sample_labels).tolist()):
        of_class = (real_labels == c).nonzero().flatten()
        if len(of_class) < wanted:
            raise UsageError(f"{flag}: {len(of_class)} images of class {c}; the floor needs {wanted} (as many as "
                             f"samples of it): lower --num_samples or add held-out images")
        floor.append(of_class[:wanted])
    floor = torch.cat(floor).sort().values
    keep = torch.ones(len(real_labels), dtype=torch.bool)
    keep[floor] = False
    return floor, keep.nonzero().flatten()


def reference_class_shift(real_labels, reference):
    """How far taking the floor out moved the reference's class proportions: the largest relative change
    of a class's share, max_c |share_c(reference) - share_c(all)| / share_c(all), over int64 labels [N]
    of all real images and the reference's indices. Class proportions are part of the feature
    distribution FD compares, so a floor that takes much of a class skews every row's FD; with 500 per
    digit out of MNIST's 10,000 test images the digits 1 and 5 move by 12%."""
    counts = torch.bincount(real_labels).double()
    kept = torch.bincount(real_labels[reference], minlength=len(counts)).double()
    share, kept_share = counts / counts.sum(), kept / kept.sum()
    return ((kept_share - share).abs() / share.clamp(min=1e-12)).max().item()


def score_images(classifier, images_uint8, labels, reference_mu, reference_sigma, device="cpu"):
    """(FD of the classifier's features against the reference statistics, the fraction of images
    classified as their label: NaN when labels is None)."""
    features, logits = features_and_logits(classifier, images_uint8, device=device)
    fd = frechet_distance(*feature_statistics(features), reference_mu, reference_sigma)
    accuracy = (logits.argmax(1).cpu() == labels.cpu()).float().mean().item() if labels is not None else float("nan")
    return fd, accuracy


def earlier_samples(folder, flag="--save_samples"):
    """The files an earlier save_sample_folder left in folder (<index>.png and <class>/<index>.png), which a
    new draw replaces. Anything else there was not written by this tool: a one-line error, at start-up."""
    if not os.path.isdir(folder):
        return []
    ours = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        # a file directly inside (unconditional), or the files of a class subfolder
        files = [os.path.join(path, name) for name in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        for file in files:
            if not (os.path.isfile(file) and SAMPLE_FILE.fullmatch(os.path.basename(file))):
                raise UsageError(f"{flag}: {file} was not written by this tool, and each setting's folder is "
                                 f"replaced whole; move it, or pick another {flag}")
            ours.append(file)
    return ours


def save_sample_folder(images_uint8, labels, class_names, folder):
    """Every image of uint8 [N x C x H x W] as folder/<its class name>/<index>.png (folder/<index>.png
    without classes): the layout tools/evaluate.py --samples reads. An earlier draw there goes first, so
    the folder holds exactly this one: a draw of fewer samples would leave the earlier one's extra files
    among its own, and evaluate.py would score both as one set."""
    for file in earlier_samples(folder):
        os.remove(file)
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:  # class subfolders left empty
        if os.path.isdir(os.path.join(folder, entry)) and not os.listdir(os.path.join(folder, entry)):
            os.rmdir(os.path.join(folder, entry))
    for i, image in enumerate(images_uint8):
        subfolder = os.path.join(folder, class_names[int(labels[i])]) if labels is not None else folder
        os.makedirs(subfolder, exist_ok=True)
        save_image(image, os.path.join(subfolder, f"{i:05d}.png"))


def setting_name(*parts):
    """A file or folder name for one setting, e.g. ("pets_ema", "ddim eta=1 quadratic (bf16)", 50) ->
    "pets_ema_ddim_eta=1_quadratic_bf16_50": no spaces or brackets for the shell to trip on."""
    return re.sub(r"[^\w.=-]+", "_", " ".join(map(str, parts)))


def check_classifier_fits(classifier_state, model_config, class_names, flag="--classifier"):
    """One-line errors when the offline classifier was made for other images or other classes."""
    made_for = (classifier_state["config"]["image_size"], classifier_state["config"]["channels"])
    size, channels = model_config["image_size"], model_config["in_channels"]
    if made_for != (size, channels):
        raise UsageError(f"{flag}: made for {made_for[0]}px, {made_for[1]}-channel images; the model makes {size}px, "
                         f"{channels}-channel ones; train one with tools/classifier.py --image_size {size} "
                         f"--channels {channels}")
    if class_names and class_names != classifier_state["class_names"]:
        raise UsageError(f"{flag}: its classes differ from the model's")


def check_reference_classes(found, expected, flag):
    """The reference folder's class subfolders must be the classes the labels index (the model's, or the
    classifier's): with one more or one fewer, label k names another class and the floor's proportions
    and every class accuracy go quietly wrong."""
    if expected and found != expected:
        shown = (lambda names: ", ".join(names[:6]) + (", ..." if len(names) > 6 else ""))
        if sorted(found) == sorted(expected):  # numbered folders, which versions before 2026-11-29 sorted as text
            raise UsageError(f"{flag}: the same classes as the model's, in another order ({shown(found)} against "
                             f"{shown(expected)}): the model was made by an older version that sorted numbered class "
                             "folders as text; retrain it (or its offline classifier) with this version")
        raise UsageError(f"{flag}: its class folders ({shown(found) or 'none'}) are not the model's classes "
                         f"({shown(expected)}); point it at held-out images with the same class folders")


def check_whole_model(state, path, flag="--ckpt"):
    """An expert denoiser (train.py --t_min/--t_max; experts.py) learned one interval of t only. A tool that
    measures one checkpoint would run it alone at every t and score it for steps it never learned, so it is
    refused here (sample.py warns instead, and joins the experts into one model when given them all)."""
    t_min, t_max = expert_range(state)
    last = state["diffusion_config"]["timesteps"] - 1
    if (t_min, t_max) != (0, last):
        raise UsageError(f"{flag} {path}: an expert denoiser for t = {t_min}..{t_max} only (of 0..{last}; train.py "
                         "--t_min/--t_max), which this tool would run alone at every t; pass a model trained on "
                         "every t (sample.py --ckpt A --ckpt B samples the experts together)")


def sampler_settings(args, amp="off"):
    """The (sampler kind, eta, spacing, name in the table) of every setting: DDPM once; DDIM once per
    (eta, spacing), where the plain name "ddim" is eta 0 with uniform spacing; " (bf16)" added under --amp."""
    settings = [("ddpm", 0.0, "uniform")] if "ddpm" in args.samplers else []
    if "ddim" in args.samplers:
        settings += [("ddim", eta, spacing) for eta in args.eta for spacing in args.spacing]
    named = []
    for kind, eta, spacing in settings:
        name = kind if (kind == "ddpm" or (eta == 0 and spacing == "uniform")) else f"ddim eta={eta:g} {spacing}"
        named.append((kind, eta, spacing, name + (f" ({amp})" if amp != "off" else "")))
    return named


def check_outputs(args, run, names):
    """--plot, --grids and --save_samples can be written, and hold nothing of someone else's: checked before
    the sampling, which they would otherwise fail after. names: every setting's setting_name."""
    if args.plot:
        check_output_file(args.plot, "--plot", PLOT_SUFFIXES)
    if args.grids:
        check_output_folder(args.grids, "--grids")
        for name in names:  # a folder standing where a grid goes
            check_output_file(os.path.join(args.grids, f"{name}.png"), "--grids")
    if args.save_samples:
        check_output_folder(args.save_samples, "--save_samples")
        for name in [setting_name(run, "real")] + names:
            folder = os.path.join(args.save_samples, name)
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise UsageError(f"--save_samples: {folder} is a file, where this setting's folder goes; move it")
            earlier_samples(folder)


def plot(csv_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["sampler"] != "real"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["run"], r["sampler"]) for r in rows}):
        mine = sorted((r for r in rows if (r["run"], r["sampler"]) == key), key=lambda r: int(r["steps"]))
        steps = [int(r["steps"]) for r in mine]
        left.plot(steps, [float(r["fd"]) for r in mine], "o-", label=f"{key[0]} {key[1]}")
        right.plot(steps, [float(r["seconds"]) for r in mine], "o-", label=f"{key[0]} {key[1]}")
    for ax, label in ((left, "Frechet distance (classifier features), lower is better"),
                      (right, "wall time for the samples (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (network calls per image)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.num_samples < 2 or args.batch_size < 1:
        raise UsageError("--num_samples must be at least 2 and --batch_size at least 1")
    for eta in args.eta:  # before any sampling, rather than after the first settings' rows
        check_eta(eta)
    if "ddim" not in args.samplers and (args.eta != [0.0] or args.spacing != ["uniform"]):
        raise UsageError("--eta and --spacing set the DDIM rows only, and --samplers has no ddim; add ddim to "
                         "--samplers or drop them")
    check_csv_table(args.csv, FIELDS)  # now, not after the sampling
    state = load_checkpoint(args.ckpt, required=("model_config", "diffusion_config", "ema"), task="diffusion")
    check_whole_model(state, args.ckpt)
    diffusion = GaussianDiffusion(**state["diffusion_config"])
    bad = [s for s in args.steps if not 1 <= s <= diffusion.timesteps]
    if bad:
        raise UsageError(f"--steps {bad}: must be between 1 and the model's T = {diffusion.timesteps}")
    device = pick_device(args.device)
    amp = resolve_amp(args.amp, device)
    if note := emulated_bf16_note(args.amp, amp, device):
        print(note)
    model = build_model(state["model_config"])
    load_weights(model, state["ema"], args.ckpt)
    model = prepare_network(model, device, amp)  # as sample.py runs it: layout, autocast
    diffusion = diffusion.to(device)
    classifier, classifier_state = load_classifier(args.classifier)
    classifier = classifier.to(device)
    config, class_names = state["model_config"], state.get("class_names") or []
    size, channels = config["image_size"], config["in_channels"]
    check_classifier_fits(classifier_state, config, class_names, f"--classifier {args.classifier}")
    run = args.run_name or os.path.splitext(os.path.basename(args.ckpt))[0]
    settings = sampler_settings(args, amp)
    check_outputs(args, run, [setting_name(run, name, steps) for *_, name in settings for steps in args.steps])

    # Samples: every setting starts from the same x_T; a conditional model's labels cycle through the classes.
    noise = torch.randn(args.num_samples, channels, size, size, generator=torch.Generator().manual_seed(args.seed))
    labels = torch.arange(args.num_samples) % len(class_names) if class_names else None

    # One random draw of real images: num_samples of them are scored like samples (the floor, with the
    # samples' class proportions), the rest give the reference statistics.
    limit = args.num_reference + args.num_samples if args.num_reference else 0
    real, real_labels, real_classes = load_folder(args.reference_path, size, channels, limit, seed=args.seed,
                                                  flag="--reference_path")
    check_reference_classes(real_classes, class_names, f"--reference_path {args.reference_path}")
    if len(real) < 2 * args.num_samples:
        raise UsageError(f"--reference_path {args.reference_path}: {len(real)} images; need at least twice "
                         f"--num_samples ({2 * args.num_samples})")
    floor, rest = split_floor_and_reference(real_labels, args.num_samples, labels,
                                            f"--reference_path {args.reference_path}")
    reference = real[rest]
    shift = reference_class_shift(real_labels, rest) if class_names else 0.0
    if shift > 0.05:
        print(f"note: the floor took so much of some classes that the reference's class proportions moved by "
              f"{shift:.0%}, which shifts every FD below; for "
              f"--num_samples {args.num_samples} pass a larger --reference_path (e.g. the training split)")
    ref_features, _ = features_and_logits(classifier, reference, device=device)
    ref_mu, ref_sigma = feature_statistics(ref_features)
    print(f"reference: {len(reference)} images from {args.reference_path}; classifier test accuracy "
          f"{classifier_state['test_accuracy']:.4f}")

    def score(images_uint8, labels):
        return score_images(classifier, images_uint8, labels, ref_mu, ref_sigma, device)

    rows = []
    # The floor: num_samples real images, disjoint from the reference, scored the same way.
    fd, accuracy = score(real[floor], real_labels[floor] if class_names else None)
    rows.append(dict(run=run, sampler="real", steps=0, num_samples=args.num_samples, fd=f"{fd:.3f}",
                     class_accuracy=f"{accuracy:.4f}", seconds=0, device=str(device)))
    proportions = " (in the samples' class proportions)" if class_names else ""
    print(f"real images{proportions}: FD {fd:.3f}, class accuracy {accuracy:.4f}")
    if args.save_samples:  # the floor too, as read here (e.g. 28x28 digits resized to 32), for evaluate.py
        save_sample_folder(real[floor], real_labels[floor] if class_names else None, real_classes,
                           os.path.join(args.save_samples, setting_name(run, "real")))
    # DDIM gives one row per (eta, spacing) (sampler_settings)
    for kind, eta, spacing, sampler in settings:
        for steps in args.steps:
            images, seconds = draw_samples(diffusion, model, kind, steps, noise, labels, args.batch_size, args.seed,
                                           eta, spacing)
            fd, accuracy = score(images, labels)
            rows.append(dict(run=run, sampler=sampler, steps=steps, num_samples=args.num_samples, fd=f"{fd:.3f}",
                             class_accuracy=f"{accuracy:.4f}", seconds=f"{seconds:.1f}", device=str(device)))
            print(f"{run} {sampler} {steps} steps: FD {fd:.3f}, class accuracy {accuracy:.4f}, {seconds:.1f} s")
            name = setting_name(run, sampler, steps)
            if args.grids:
                save_grid(images[:64], os.path.join(args.grids, f"{name}.png"), nrow=8)
            if args.save_samples:
                save_sample_folder(images, labels, class_names, os.path.join(args.save_samples, name))

    append_csv_rows(args.csv, FIELDS, rows)
    print(f"{len(rows)} rows appended to {args.csv}")
    if args.plot:
        plot(args.csv, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
