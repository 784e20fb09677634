"""
Negative log-likelihood of held-out images under a trained model, in bits per dimension: the number
Improved DDPM (Nichol & Dhariwal 2021) reports, computed as the full variational bound of DDPM eq. 5
(improved_ddpm.nll_bits_per_dim): all T terms per image, so T network calls per batch.

    python tools/nll.py --ckpt checkpoints/mnist_ema.pt --dataset_path data/mnist_test --num_images 256

Lower is better; it is an upper bound on the model's true NLL. Models trained with --loss hybrid or
kl (and --learn_sigma) score far better than L_simple models with fixed variances, whose first
few terms are poor: the printed breakdown by t shows where the bits go. Use images the model did
not train on. A class-conditional model needs the same class folder names as its training data.
"""
import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm import GaussianDiffusion  # noqa: E402
from improved_ddpm import nll_bits_per_dim  # noqa: E402
from model import build_model  # noqa: E402
from sampler_sweep import check_whole_model  # noqa: E402
from utils import (ImageFolderDataset, UsageError, load_checkpoint, load_weights, pick_device,  # noqa: E402
                   seed_everything, to_model_range)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Bits per dimension of held-out images under a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    p.add_argument("--dataset_path", required=True, help="folder of held-out images (class subfolders for "
                   "a class-conditional model); an .npz of arrays is not read: write its test split out as a "
                   "folder with tools/export_dataset.py DATA.npz FOLDER --split test")
    p.add_argument("--num_images", type=int, default=256, help="random images to evaluate (0 = all)")
    p.add_argument("--batch_size", type=int, default=64, help="images per batch")
    p.add_argument("--no_clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed for the image choice and the x_t noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_images < 0 or args.batch_size < 1:
        raise UsageError("--num_images must be >= 0 and --batch_size >= 1")
    state = load_checkpoint(args.ckpt, required=("model_config", "diffusion_config", "ema"), task="diffusion")
    check_whole_model(state, args.ckpt)  # the bound sums every t's term: an expert alone knows only some of them
    config = state["model_config"]
    class_names = state.get("class_names") or []
    dataset = ImageFolderDataset(args.dataset_path, config["image_size"], config["in_channels"])
    if class_names and list(dataset.class_names) != list(class_names):
        raise UsageError(f"--dataset_path {args.dataset_path}: this model is class-conditional with classes "
                         f"{class_names[:5]}...; the folder has {list(dataset.class_names)[:5]}...; "
                         "use held-out images in folders with the same names")
    device = pick_device(args.device)
    model = build_model(config)
    load_weights(model, state["ema"], args.ckpt)
    seed_everything(args.seed)  # after the network is built: its initial weights draw from the same generator
    model = model.to(device).eval()
    diffusion = GaussianDiffusion(**state["diffusion_config"]).to(device)

    count = len(dataset) if args.num_images == 0 else min(args.num_images, len(dataset))
    # Its own generator: the global one has drawn the network's initial weights (build_model), so the images
    # would depend on the network's size and two models would not be scored on the same ones.
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:count].tolist()
    print(f"{args.ckpt}: {diffusion.describe()}")
    print(f"{count} images from {args.dataset_path}; {diffusion.timesteps} network calls per batch of "
          f"{args.batch_size}")
    started = time.perf_counter()
    totals, terms, priors = [], [], []
    for start in tqdm(range(0, count, args.batch_size), desc="batches"):
        items = [dataset[i] for i in chosen[start:start + args.batch_size]]
        x0 = to_model_range(torch.stack([image for image, _ in items])).to(device)     # [B x C x S x S]
        y = torch.tensor([label for _, label in items], device=device) if class_names else None
        result = nll_bits_per_dim(diffusion, model, x0, y, clip_denoised=not args.no_clip, progress=True)
        totals.append(result["total"].cpu())
        terms.append(result["terms"].cpu())
        priors.append(result["prior"].cpu())
    total, terms, prior = torch.cat(totals), torch.cat(terms), torch.cat(priors)
    elapsed = time.perf_counter() - started

    stderr = total.std().item() / max(1, len(total)) ** 0.5 if len(total) > 1 else float("nan")
    print(f"NLL bound: {total.mean().item():.4f} +- {stderr:.4f} bits/dim (mean +- standard error over "
          f"{len(total)} images, {elapsed:.0f} s)")
    T = diffusion.timesteps
    edges = [0, 1, 10, 100, T] if T > 100 else [0, 1, T]
    parts = [f"t={a}{'' if b == a + 1 else '..' + str(b - 1)}: {terms[:, a:b].sum(1).mean().item():.4f}"
             for a, b in zip(edges[:-1], edges[1:]) if a < b <= T]
    print("where the bits go (code t; t=0 is the decoder -log p(x_0|x_1)): " + ", ".join(parts)
          + f", prior L_T: {prior.mean().item():.2e}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
