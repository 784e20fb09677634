"""
The effect of the guidance scale, as a picture and as numbers: one row per class, one column per
scale, every column starting from the same noise, so a row shows one sample's journey from
unguided to strongly guided.

    # classifier-free guidance (guidance.py): s = 1 is the plain conditional model, s = 0 unconditional
    python tools/guidance_sweep.py --ckpt checkpoints/mnist_ema.pt --scales 0 1 2 4 --out images/mnist_cfg.png

    # classifier guidance (ADM) of the same network's unconditional half ("no label"), with a noisy classifier
    python tools/guidance_sweep.py --ckpt checkpoints/mnist_ema.pt --mode classifier \
        --classifier_ckpt checkpoints/mnist_classifier_ema.pt --scales 0 1 3 10 --out images/mnist_cg.png

With --eval_classifier (tools/classifier.py) and --reference_path it also scores each scale: the
fraction of samples that the offline classifier assigns to the class asked for, and the Frechet
distance of its features to real images (lower is better), appended to --csv. Guidance trades the
second for the first: the README's Results show by how much.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from classifier import features_and_logits, feature_statistics, frechet_distance, load_classifier, load_folder  # noqa: E402
from ddim import ddim_sample  # noqa: E402
from ddpm import GaussianDiffusion  # noqa: E402
from guidance import classifier_free_guidance, classifier_guidance  # noqa: E402
from improved_ddpm import respace  # noqa: E402
from model import build_classifier, build_model  # noqa: E402
from sampler_sweep import check_classifier_fits, check_reference_classes, check_whole_model  # noqa: E402
from utils import (UsageError, append_csv_rows, check_csv_table, check_output_file, from_model_range,  # noqa: E402
                   load_checkpoint, load_weights, pick_device, save_grid)

FIELDS = ["run", "mode", "scale", "sampler", "steps", "num_samples", "class_accuracy", "fd", "seconds", "device"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Samples and scores against the guidance scale.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a class-conditional diffusion checkpoint (train.py)")
    p.add_argument("--mode", default="cfg", choices=("cfg", "classifier"),
                   help="cfg: --guidance_scale of classifier-free guidance; classifier: --classifier_scale of "
                   "classifier guidance applied to the model's unconditional ('no label') prediction")
    p.add_argument("--classifier_ckpt", default=None, help="noisy classifier (train.py --task classifier), --mode classifier")
    p.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--classes", type=int, nargs="*", default=None, help="class indices (default: up to 10)")
    p.add_argument("--per_class", type=int, default=1, help="samples per class and scale")
    p.add_argument("--show", type=int, default=1, help="samples per class and scale in the picture")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    p.add_argument("--steps", type=int, default=50, help="network calls per image (ddpm: respaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the picture (PNG)")
    p.add_argument("--eval_classifier", default=None, help="tools/classifier.py checkpoint, to score each scale")
    p.add_argument("--reference_path", default=None, help="held-out real images (class subfolders) for the FD")
    p.add_argument("--num_reference", type=int, default=2000)
    p.add_argument("--csv", default=None, help="scores are appended here")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Flags that would be accepted and then do nothing, or draw something other than they say, first.
    bad = [s for s in args.scales if not (math.isfinite(s) and s >= 0)]
    if bad:  # NaN would fail every comparison below and draw unguided columns labelled as guided
        raise UsageError(f"--scales {' '.join(f'{s:g}' for s in bad)}: each scale must be finite and >= 0 "
                         "(cfg: 1 is the conditional model, 0 the unconditional one; classifier: 0 is no guidance)")
    if args.mode == "classifier" and not args.classifier_ckpt:
        raise UsageError("--mode classifier needs --classifier_ckpt (train.py --task classifier)")
    if args.mode == "cfg" and args.classifier_ckpt:
        raise UsageError("--classifier_ckpt guides --mode classifier only; --mode cfg would ignore it: pass "
                         "--mode classifier or drop it")
    if args.eval_classifier and not (args.reference_path and args.csv):
        raise UsageError("--eval_classifier needs --reference_path and --csv")
    if not args.eval_classifier and (args.csv or args.reference_path):
        raise UsageError(f"{'--csv' if args.csv else '--reference_path'}: the scores come from --eval_classifier "
                         "(a tools/classifier.py checkpoint), which is not given; pass it or drop the flag")
    check_output_file(args.out, "--out", (".png", ".jpg", ".jpeg", ".webp"))  # now, not after the sampling
    if args.csv:
        check_csv_table(args.csv, FIELDS)
    device = pick_device(args.device)
    state = load_checkpoint(args.ckpt, required=("model_config", "diffusion_config", "ema"), task="diffusion")
    class_names = state.get("class_names") or []
    if not class_names:
        raise UsageError(f"--ckpt {args.ckpt}: not class-conditional; guidance sweeps need classes")
    check_whole_model(state, args.ckpt)
    diffusion = GaussianDiffusion(**state["diffusion_config"]).to(device)
    if not 1 <= args.steps <= diffusion.timesteps:
        raise UsageError(f"--steps {args.steps}: must be between 1 and T = {diffusion.timesteps}")
    model = build_model(state["model_config"])
    load_weights(model, state["ema"], args.ckpt)
    model = model.to(device).eval()
    null = len(class_names)
    classifier = None
    if args.mode == "classifier":
        clf_state = load_checkpoint(args.classifier_ckpt, required=("model_config", "ema", "class_names"),
                                    flag="--classifier_ckpt")
        if clf_state.get("task") != "classifier" or clf_state["class_names"] != class_names:
            raise UsageError(f"--classifier_ckpt {args.classifier_ckpt}: not a noisy classifier of this model's classes")
        classifier = build_classifier(clf_state["model_config"])
        load_weights(classifier, clf_state["ema"], args.classifier_ckpt, "--classifier_ckpt")
        classifier = classifier.to(device).eval()

    classes = args.classes if args.classes else list(range(min(10, len(class_names))))
    if any(not 0 <= c < len(class_names) for c in classes):  # index len(class_names) is the "no label" row
        raise UsageError(f"--classes {args.classes}: class indices run from 0 to {len(class_names) - 1} "
                         f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})")
    if not 1 <= args.show <= args.per_class:  # more would show the next class's samples in this class's row
        raise UsageError(f"--show {args.show}: between 1 and --per_class {args.per_class}")
    size, channels = state["model_config"]["image_size"], state["model_config"]["in_channels"]
    labels = torch.tensor(classes).repeat_interleave(args.per_class).to(device)
    noise = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    sampling = respace(diffusion, args.steps) if args.sampler == "ddpm" and args.steps < diffusion.timesteps else diffusion

    scorer = None
    if args.eval_classifier:
        scorer, scorer_state = load_classifier(args.eval_classifier, "--eval_classifier")
        check_classifier_fits(scorer_state, state["model_config"], class_names, "--eval_classifier")
        scorer = scorer.to(device)
        real, real_labels, real_classes = load_folder(args.reference_path, size, channels, args.num_reference,
                                                      seed=args.seed, flag="--reference_path")
        check_reference_classes(real_classes, class_names, f"--reference_path {args.reference_path}")
        drawn = torch.isin(real_labels, torch.tensor(classes))  # FD against the classes drawn, not the others
        if not bool(drawn.all()):
            real = real[drawn]
            print(f"reference: the {len(real)} of {len(drawn)} real images whose classes are drawn here")
        if len(real) < 2:
            raise UsageError(f"--reference_path {args.reference_path}: {len(real)} images of the classes drawn; "
                             "raise --num_reference")
        ref_mu, ref_sigma = feature_statistics(features_and_logits(scorer, real, device=device)[0])

    def unconditional(x, t, y):  # the network with every label replaced by "no label"
        return model(x, t, torch.full_like(y, null))

    columns, rows = [], []
    run = os.path.splitext(os.path.basename(args.ckpt))[0]
    for scale in args.scales:
        cond_fn = None
        if args.mode == "cfg" and scale == 1:
            network = model                                       # s = 1: the conditional model itself
        elif args.mode == "cfg" and scale == 0:
            network = unconditional                               # s = 0: the unconditional model
        elif args.mode == "cfg":
            network = classifier_free_guidance(model, scale, null)
        else:
            network = unconditional
            cond_fn = classifier_guidance(classifier, scale) if scale > 0 else None
        # the same per-step noise in every column; seed + 1, not seed, which drew x_T above: on a CPU the
        # first step's z would be x_T itself (as in sampler_sweep.draw_samples)
        torch.manual_seed(args.seed + 1)
        started = time.perf_counter()
        if args.sampler == "ddim":
            images = ddim_sample(diffusion, network, noise.shape, args.steps, 0.0, "uniform", labels, noise,
                                 cond_fn=cond_fn)
        else:
            images = sampling.sample(network, noise.shape, labels, noise, cond_fn=cond_fn)
        if device.type == "cuda":  # the GPU's queued work belongs to this column's time
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        images = from_model_range(images)
        columns.append(images)
        line = f"{args.mode} scale {scale:g}: {len(images)} samples in {seconds:.1f} s"
        if scorer is not None:
            features, logits = features_and_logits(scorer, images, device=device)
            accuracy = (logits.argmax(1) == labels.cpu()).float().mean().item()
            fd = frechet_distance(*feature_statistics(features), ref_mu, ref_sigma)
            rows.append(dict(run=run, mode=args.mode, scale=f"{scale:g}", sampler=args.sampler, steps=args.steps,
                             num_samples=len(images), class_accuracy=f"{accuracy:.4f}", fd=f"{fd:.3f}",
                             seconds=f"{seconds:.1f}", device=str(device)))
            line += f", class accuracy {accuracy:.3f}, FD {fd:.2f}"
        print(line, flush=True)

    # Picture: rows = classes; within a row, for each scale (left to right) its first --show samples.
    picture = []
    for i in range(len(classes)):
        for images in columns:
            picture.append(images[i * args.per_class:i * args.per_class + args.show])
    save_grid(torch.cat(picture), args.out, nrow=len(args.scales) * args.show)
    print(f"rows: classes {', '.join(class_names[c] for c in classes)}; columns: scales "
          f"{', '.join(f'{s:g}' for s in args.scales)}: {args.out}")
    if rows:
        append_csv_rows(args.csv, FIELDS, rows)
        print(f"{len(rows)} rows appended to {args.csv}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
