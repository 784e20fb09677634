"""
A small image classifier trained on your own dataset, to measure generated images offline (no
download, no Inception network): its 64 penultimate features give a dataset-specific Frechet distance
(the FID recipe of Heusel et al. 2017 with this network in place of Inception), and its predictions give
the class accuracy of class-conditional samples, the usual protocol on MNIST-like data.

    python tools/export_dataset.py ../shared/data/mnist.npz data/mnist_test --split test
    python tools/classifier.py --train_path data/mnist --test_path data/mnist_test --out checkpoints/mnist_eval_classifier.pt

The checkpoint stores the weights, its configuration, the class names, the seed and the accuracy on the
test folder. Numbers from different classifiers are not comparable, and they are not FID: they rank
models and settings measured with the same classifier and the same number of images.
tools/sampler_sweep.py uses it.
"""
import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import (ImageFolderDataset, UsageError, check_keys, check_output_file, load_checkpoint,  # noqa: E402
                   load_weights, pick_device, save_checkpoint, seed_everything, to_model_range)

FEATURE_DIM = 64


def build_classifier(config):
    """A plain CNN: three conv stages (32 -> 64 -> 64 channels, halving the size twice), global average
    pooling to a 64-d feature vector, and a linear layer to the classes. config: dict(image_size,
    channels, num_classes). Input: images in [-1, 1], [B x C x S x S]."""
    c = config["channels"]
    features = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, FEATURE_DIM, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(features, nn.Linear(FEATURE_DIM, config["num_classes"]))


@torch.no_grad()
def features_and_logits(classifier, images_uint8, batch_size=256, device="cpu"):
    """uint8 images [N x C x S x S] -> (features float64 [N x 64], logits [N x classes]), on the CPU."""
    if images_uint8.dtype != torch.uint8:  # to_model_range reads 0..255: [0, 1] floats would be near-black
        raise TypeError(f"features_and_logits takes uint8 images (0..255), got {images_uint8.dtype}")
    classifier.eval()
    feats, logits = [], []
    for start in range(0, len(images_uint8), batch_size):
        x = to_model_range(images_uint8[start:start + batch_size]).to(device)
        f = classifier[0](x)
        feats.append(f.cpu().double())  # to the CPU first: Apple's MPS has no float64
        logits.append(classifier[1](f).cpu())
    return torch.cat(feats), torch.cat(logits)


def sqrtm_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix by its eigen-decomposition
    (A = V diag(w) V^T -> A^(1/2) = V diag(sqrt(w)) V^T), tiny negative eigenvalues from rounding set to 0."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, the FID formula):
        |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    Tr((sigma1 sigma2)^(1/2)) is computed without SciPy as the sum of the square roots of the eigenvalues
    of sigma1^(1/2) sigma2 sigma1^(1/2), which is symmetric PSD and has the same eigenvalues."""
    root1 = sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def feature_statistics(features):
    """features [N x D] -> (mean [D], covariance [D x D]) as float64 numpy arrays. With N <= D the
    covariance is singular and FD is mostly its small-sample bias: a warning says so."""
    if len(features) <= features.shape[1]:
        warnings.warn(f"Frechet distance from {len(features)} images of {features.shape[1]} features: the covariance "
                      "is singular and the distance is dominated by its small-sample bias; use more images than "
                      "features, and compare only at equal counts")
    f = features.double().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def load_classifier(path, flag="--classifier"):
    """A checkpoint written by this script -> (classifier in eval mode, the checkpoint's dict)."""
    state = load_checkpoint(path, required=(), flag=flag, written_by="tools/classifier.py")
    if isinstance(state, dict) and "model_config" in state and "classifier" not in state:  # a train.py checkpoint
        kind = ("a noisy classifier (train.py --task classifier), made for classifier guidance"
                if state.get("task") == "classifier" else "a diffusion model (train.py)")
        raise UsageError(f"{flag} {path}: {kind}; the scores need the offline classifier of tools/classifier.py "
                         "(python tools/classifier.py --train_path ... --test_path ... --out ...)")
    check_keys(state, path, ("classifier", "config", "class_names", "test_accuracy"), flag)
    chance = 1 / max(1, len(state["class_names"]))
    if state["test_accuracy"] < 1.5 * chance:  # its features then carry little, and FD or KID mean little
        warnings.warn(f"{flag} {path}: test accuracy {state['test_accuracy']:.2f}, near chance ({chance:.2f}); scores "
                      "from its features mean little: train it longer (--epochs) or on more images")
    classifier = build_classifier(state["config"])
    load_weights(classifier, state["classifier"], path, flag)
    return classifier.eval(), state


def load_folder(path, image_size, channels, limit=0, seed=0, flag="--dataset_path"):
    """A folder of class subfolders -> (uint8 images [N x C x S x S], labels int64 [N], class names);
    a random `limit` of them when limit > 0."""
    dataset = ImageFolderDataset(path, image_size, channels, flag=flag)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    order = order[:limit] if limit else order
    items = [dataset[i] for i in tqdm(order.tolist(), desc=f"loading {os.path.basename(os.path.normpath(path))}",
                                      leave=False)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), list(dataset.class_names)


def check_out_path(path):
    """Before any training: --out may replace an earlier classifier of this tool, never anything else
    (train.py's --task classifier run is also named <data>_classifier.pt, and holds a resumable run)."""
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a folder; pass a file path such as {os.path.join(path, 'classifier.pt')}")
    check_output_file(path, "--out")  # a folder that can be written, before the training, not after it
    if os.path.exists(path):
        try:
            earlier = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            earlier = None
        if not (isinstance(earlier, dict) and {"classifier", "test_accuracy"} <= set(earlier)):
            raise UsageError(f"--out {path} exists and is not a classifier written by this tool (a train.py run?); "
                             "pick another path, such as checkpoints/<data>_eval_classifier.pt")
        print(f"note: replacing the earlier classifier in {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the small offline classifier used for sample-quality numbers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train_path", required=True, help="training images, one subfolder per class")
    p.add_argument("--test_path", required=True, help="held-out images with the same class subfolders")
    p.add_argument("--out", required=True, help="classifier checkpoint to write")
    p.add_argument("--image_size", type=int, default=32, help="match the diffusion model's image size")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3), help="default: from the images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        raise UsageError("--epochs and --batch_size must be at least 1")
    if args.image_size < 4:  # two 2x2 poolings
        raise UsageError(f"--image_size {args.image_size}: the classifier halves the images twice; use 4 or more")
    if not (math.isfinite(args.lr) and args.lr > 0):  # inf trained to NaN weights and saved them
        raise UsageError(f"--lr {args.lr}: a learning rate must be a positive number, such as 1e-3")
    check_out_path(args.out)

    seed_everything(args.seed)
    device = pick_device(args.device)
    train_x, train_y, class_names = load_folder(args.train_path, args.image_size, args.channels, flag="--train_path")
    test_x, test_y, test_classes = load_folder(args.test_path, args.image_size, train_x.shape[1], flag="--test_path")
    if len(class_names) < 2:
        raise UsageError(f"--train_path {args.train_path}: need at least 2 class subfolders to train a classifier")
    if test_classes != class_names:
        raise UsageError(f"--test_path {args.test_path}: its class folders {test_classes[:5]}... differ from "
                         f"--train_path's {class_names[:5]}...")
    config = dict(image_size=args.image_size, channels=int(train_x.shape[1]), num_classes=len(class_names))
    classifier = build_classifier(config).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.lr)
    steps_per_epoch = len(train_x) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * max(1, steps_per_epoch))
    started = time.perf_counter()
    for epoch in range(args.epochs):
        classifier.train()
        order = torch.randperm(len(train_x))
        bar = tqdm(range(max(1, steps_per_epoch)), desc=f"epoch {epoch + 1}/{args.epochs}")
        for i in bar:
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(classifier(to_model_range(train_x[idx]).to(device)), train_y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    _, logits = features_and_logits(classifier, test_x, device=device)
    accuracy = (logits.argmax(1) == test_y).float().mean().item()
    save_checkpoint(dict(classifier=classifier.cpu().state_dict(), config=config, class_names=class_names,
                         test_accuracy=accuracy, seed=args.seed, train_path=args.train_path), args.out)
    print(f"test accuracy {accuracy:.4f} on {len(test_x)} images after {args.epochs} epochs "
          f"({time.perf_counter() - started:.0f} s): {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
