"""
Sample-quality metrics: a folder of generated images scored against a folder of real ones.

    python tools/evaluate.py --samples samples/cars_individual --reference data/cars_test \
        --classifier checkpoints/cars_classifier.pt
    python tools/evaluate.py --samples samples/x --reference data/mnist_test \
        --classifier checkpoints/mnist_eval_classifier.pt --json results.json

Four numbers, each computed from features of the images (one function each below):

    FD / FID   Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ...", the Frechet
               distance between Gaussians fitted to the two feature sets (lower is better)
    KID        Binkowski et al. 2018, "Demystifying MMD GANs", eq. 4: the unbiased MMD^2 with the
               cubic polynomial kernel, averaged over random subsets (lower is better; can be < 0);
               on the classifier's features after standardising them (standardise_features says why)
    IS         Salimans et al. 2016, "Improved Techniques for Training GANs", Sec. 4:
               exp(E_x KL(p(y|x) || p(y))) from the network's class probabilities (higher is better)
    P / R      Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
               Generative Models", eq. 1-2: the fraction of samples inside the k-NN manifold of the
               real features (precision) and of real features inside the samples' (recall)

../shared/PAPERS.md does not cover these four papers: their equation and section numbers here are
recalled, not checked against the printed papers.

The features come from one of two networks:

    --features classifier (default)  the small offline classifier of tools/classifier.py: its 64
        penultimate features and its logits. The "FD" is the FID recipe with this network in place of
        Inception, and "IS" is the classifier score (at most the number of classes). Numbers are
        comparable only between runs with the same classifier and the same image counts.
    --features inception  Inception-v3's 2048 pool features of images resized to 299x299 (bilinear),
        and its class logits, from one of two weight files, told apart by their shapes:
        - pytorch-fid's port of the TensorFlow Inception graph that the FID and IS papers' code uses
          (pt_inception-2015-12-05-6726825d.pth, 1008 classes): the FID is comparable with published
          FIDs computed by pytorch-fid (which itself reports small differences from the TensorFlow
          code). Built here as torchvision's inception_v3 with the graph's two quirks (build_fid_inception).
        - torchvision's Inception_V3_Weights.IMAGENET1K_V1 (inception_v3_google-0cc3c7bd.pth, 1000
          classes): a different network; its numbers are NOT comparable with published FIDs or ISs.
        Weights are never downloaded: pass --inception_weights PATH, or leave either file in torch's
        hub cache (torch.hub.get_dir()/checkpoints/, where pytorch-fid and torchvision keep them);
        pytorch-fid's file is preferred when both are there.

FD, IS and precision/recall depend on the number of images (FD strongly; precision and recall on both
sets' counts, so 200 samples against 10,000 reference images differ from equal counts), and KID's
expectation does not, although its spread does; compare numbers only at equal counts. Every printed
line says how many images it used. The reference features are
cached (--cache_dir, default beside the classifier) and reused when the same folder, network, count
and seed come back; --no_cache recomputes them.
"""
import argparse
import hashlib
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from classifier import features_and_logits, feature_statistics, frechet_distance, load_classifier, load_folder  # noqa: E402
from utils import (ImageFolderDataset, UsageError, append_csv_rows, check_csv_table, check_output_file,  # noqa: E402
                   check_output_folder, list_images, pick_device, save_checkpoint, seed_everything, write_json)

# The two Inception weight files (see the docstring): file name -> the note printed beside every result.
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_NOTES = {
    "fid": "pytorch-fid's port of the TensorFlow FID Inception: comparable with published FIDs computed by "
           "pytorch-fid, at the same image counts",
    "torchvision": "torchvision's Inception weights, not the TensorFlow Inception of the FID papers: not "
                   "comparable with published FID/IS",
}
CSV_FIELDS = ["samples", "reference", "features", "num_samples", "num_reference", "fd", "kid_mean", "kid_std",
              "kid_features", "is_mean", "is_std", "precision", "recall", "class_accuracy", "k", "seed"]


# ---------------------------------------------------------------------------------------------
# The metrics: features in, numbers out
# ---------------------------------------------------------------------------------------------

def fid_from_features(sample_features, reference_mu, reference_sigma):
    """Frechet distance (Heusel et al. 2017, the FID formula, their eq. 6) between a Gaussian fitted to
    sample_features [N x D] and the reference Gaussian N(mu, sigma):
        d^2 = |mu_s - mu_r|^2 + Tr(sigma_s + sigma_r - 2 (sigma_s sigma_r)^(1/2)).
    classifier.py's frechet_distance computes it (without SciPy, through sqrtm_psd)."""
    mu, sigma = feature_statistics(sample_features)
    return frechet_distance(mu, sigma, reference_mu, reference_sigma)


def polynomial_kernel(x, y):
    """k(x, y) = (x . y / d + 1)^3 for rows x [N x d] and y [M x d] -> [N x M] (Binkowski et al. 2018,
    Sec. 4: the kernel of KID, chosen so that no parameters need tuning)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y):
    """The unbiased estimate of the squared MMD (Gretton et al. 2012, Lemma 6; Binkowski et al. 2018, eq. 4)
    between samples x [m x d] and y [n x d]:
        MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
                  - 2/(mn) sum_{i, j} k(x_i, y_j).
    The diagonals k(x_i, x_i) are left out, which is what makes it unbiased: its expectation is the
    true MMD^2, 0 for equal distributions, so single estimates can be negative."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(term_xx + term_yy - 2 * k_xy.mean())


def standardise_features(features, reference_features):
    """(features - mean) / std, per feature, with the reference's mean and std [D]: one fixed affine map
    for every sample set scored against the same reference. [N x D] -> [N x D].

    Why KID needs it on our classifier: the kernel (x . y / d + 1)^3 has no scale parameter, and its
    constant, linear, quadratic and cubic terms (expand the cube) weigh in together only when x . y / d
    is of order 1. The classifier's 64 SiLU features are far larger (x . y / d about 114 between MNIST
    training digits), so the cubic term swamps the other three and KID is decided by the few samples
    with the largest features: five draws of one sampler on MNIST gave raw KIDs from 100 to 3,100.
    Standardised, x . y / d is of order 1 again, all four terms count, and the same five draws give
    5.9e-3 to 9.3e-3 (README, "DDIM's 50 steps against 1000"). Inception features are left raw, so
    that their KID stays comparable with published ones."""
    mean, std = reference_features.mean(dim=0), reference_features.std(dim=0).clamp_min(1e-12)
    return (features - mean) / std


def kernel_inception_distance(sample_features, reference_features, num_subsets=10, subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4): mmd2_unbiased with the cubic polynomial
    kernel, on num_subsets random subsets of up to subset_size images from each set (drawn without
    replacement, seeded). Returns (mean, std over the subsets, the subset size used)."""
    x, y = sample_features.double(), reference_features.double()
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise UsageError("KID needs at least 2 sample and 2 reference images")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        values.append(mmd2_unbiased(x[torch.randperm(len(x), generator=generator)[:m]],
                                    y[torch.randperm(len(y), generator=generator)[:m]]))
    values = np.array(values)
    return float(values.mean()), float(values.std()), m


def inception_score(logits, splits=10):
    """Inception Score (Salimans et al. 2016, Sec. 4): exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of
    p(y|x) over the images of one split. High when each image is confidently one class (low entropy of
    p(y|x)) and the classes are used evenly (high entropy of p(y)); it lies between 1 and the number of
    classes. Computed on `splits` equal parts of the images, as in the paper's code.
    logits [N x K] -> (mean, std over the splits)."""
    log_p_yx = F.log_softmax(logits.double(), dim=1)
    scores = []
    for part in torch.tensor_split(log_p_yx, splits):
        # log p(y) = log mean_x p(y|x), computed stably from the log-probabilities.
        log_p_y = torch.logsumexp(part, dim=0) - math.log(len(part))
        kl = (part.exp() * (part - log_p_y)).sum(dim=1)  # KL(p(y|x) || p(y)) per image
        scores.append(math.exp(kl.mean().item()))
    scores = np.array(scores)
    return float(scores.mean()), float(scores.std())


def splits_for(num_images, requested=10, min_per_split=50):
    """The paper's 10 splits need many images; fewer splits, with at least min_per_split images each, when few."""
    return max(1, min(requested, num_images // min_per_split))


def knn_radii(features, k=3, chunk=1024):
    """Distance from each feature [N x D] to its k-th nearest neighbour in the same set, itself excluded
    (Kynkaanniemi et al. 2019, Sec. 2: the radius of the hypersphere around each point whose union
    estimates the manifold). torch.cdist in chunks of rows, so N x N is never held at once."""
    if len(features) <= k:
        raise UsageError(f"precision/recall with k={k} needs more than {k} images in each set")
    radii = []
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start:start + chunk], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the k+1-th smallest: the 1st is the point itself
    return torch.cat(radii)


def inside_manifold(queries, support, radii, chunk=1024):
    """f(phi, Phi) of Kynkaanniemi et al. 2019, eq. 1: 1 for each query that lies within the k-NN radius of
    at least one support feature, else 0. queries [N x D], support [M x D], radii [M] -> bool [N]."""
    inside = []
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start:start + chunk], support)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(sample_features, reference_features, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 2):
        precision = mean over samples of f(sample, reference manifold)   (are the samples realistic?)
        recall    = mean over reference of f(real, sample manifold)      (is all of the data covered?)
    with each manifold the union of k-NN balls (knn_radii). Returns (precision, recall)."""
    fake, real = sample_features.double(), reference_features.double()
    precision = inside_manifold(fake, real, knn_radii(real, k)).double().mean().item()
    recall = inside_manifold(real, fake, knn_radii(fake, k)).double().mean().item()
    return precision, recall


def compute_metrics(sample_features, sample_logits, reference_features, reference_mu=None, reference_sigma=None,
                    k=3, kid_subsets=10, kid_subset_size=1000, kid_features="standardised", is_splits=10, seed=0):
    """Every metric above for one set of sample features [N x D] (and logits [N x K]) against reference
    features [M x D]. reference_mu/sigma: the reference statistics when already known (the cache).
    kid_features: "standardised" (standardise_features) or "raw". Returns a dict of plain numbers."""
    if kid_features not in ("standardised", "raw"):
        raise ValueError(f"kid_features={kid_features!r}: 'standardised' or 'raw'")
    if reference_mu is None:
        reference_mu, reference_sigma = feature_statistics(reference_features)
    kid_samples, kid_reference = sample_features, reference_features
    if kid_features == "standardised":
        kid_samples = standardise_features(sample_features, reference_features)
        kid_reference = standardise_features(reference_features, reference_features)
    kid_mean, kid_std, kid_size = kernel_inception_distance(kid_samples, kid_reference, kid_subsets,
                                                            kid_subset_size, seed)
    splits = splits_for(len(sample_logits), is_splits)
    is_mean, is_std = inception_score(sample_logits, splits)
    precision, recall = precision_recall(sample_features, reference_features, k)
    return dict(num_samples=len(sample_features), num_reference=len(reference_features),
                fd=fid_from_features(sample_features, np.asarray(reference_mu), np.asarray(reference_sigma)),
                kid_mean=kid_mean, kid_std=kid_std, kid_subsets=kid_subsets, kid_subset_size=kid_size,
                kid_features=kid_features,
                is_mean=is_mean, is_std=is_std, is_splits=splits, precision=precision, recall=recall, k=k)


def evaluate(sample_images, reference_images, extract, **options):
    """uint8 images [N x C x S x S] and [M x C x S x S] -> compute_metrics' dict, with features from
    extract(images) -> (features, logits). options go to compute_metrics."""
    sample_features, sample_logits = extract(sample_images)
    reference_features, _ = extract(reference_images)
    return compute_metrics(sample_features, sample_logits, reference_features, **options)


# ---------------------------------------------------------------------------------------------
# The feature extractors: uint8 images in, (features float64 [N x D], logits [N x K]) out
# ---------------------------------------------------------------------------------------------

def classifier_extractor(classifier, device="cpu", batch_size=256):
    """The offline classifier's 64 penultimate features and its logits (classifier.features_and_logits),
    batch by batch under a progress bar."""
    def extract(images_uint8, desc="features"):
        feats, logits = [], []
        for start in tqdm(range(0, len(images_uint8), batch_size), desc=desc, leave=False):
            f, l = features_and_logits(classifier, images_uint8[start:start + batch_size], batch_size, device)
            feats.append(f)
            logits.append(l)
        return torch.cat(feats), torch.cat(logits)
    return extract


def inception_weights_path(given=None):
    """Where Inception weights are on disk, without downloading: the file given, else pytorch-fid's FID
    Inception file in torch.hub.get_dir()/checkpoints/, else torchvision's IMAGENET1K_V1 file there.
    UsageError if none is."""
    from torchvision.models import Inception_V3_Weights
    if given:
        if not os.path.isfile(given):
            raise UsageError(f"--inception_weights {given}: no such file")
        return given
    torchvision_file = os.path.basename(Inception_V3_Weights.IMAGENET1K_V1.url)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    for filename in (FID_INCEPTION_FILE, torchvision_file):
        if os.path.isfile(os.path.join(folder, filename)):
            return os.path.join(folder, filename)
    raise UsageError(f"--features inception: no Inception weights on disk, and they are never downloaded here; "
                     f"put pytorch-fid's {FID_INCEPTION_FILE} (for paper-comparable FIDs) or torchvision's "
                     f"{torchvision_file} in {folder}, or pass --inception_weights PATH")


def tensorflow_pooling(block, pool):
    """Make a torchvision Inception block compute its pooling branch with `pool`, as the TensorFlow graph
    does, leaving its other branches as they are. torchvision's block._forward returns the branches'
    outputs with the pooling branch last; that one is recomputed (a 1x1 convolution: cheap) and the
    channels are concatenated in the same order."""
    def forward(x):
        branches = block._forward(x)[:-1]
        return torch.cat(branches + [block.branch_pool(pool(x))], dim=1)
    block.forward = forward  # an instance attribute: nn.Module calls it in place of the class's forward


def build_fid_inception():
    """The network of pytorch-fid's weight file: torchvision's inception_v3 with 1008 classes (the
    TensorFlow graph's), no auxiliary classifier, and the graph's two differences in pooling:
      - its average pools ignore the zero padding (count_include_pad=False), in Mixed_5b-d, 6b-e, 7b;
      - the last block, Mixed_7c, max-pools its pooling branch where the paper's design averages."""
    from torchvision.models import inception_v3
    model = inception_v3(weights=None, num_classes=1008, aux_logits=False, transform_input=False,
                         init_weights=False)

    def average_without_padding(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def maximum(x):
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"):
        tensorflow_pooling(getattr(model, name), average_without_padding)
    tensorflow_pooling(model.Mixed_7c, maximum)
    return model


def load_inception(path):
    """Inception-v3 with the weights in path (weights_only=True), strictly loaded -> (model, kind): kind
    'fid' for pytorch-fid's FID Inception file (fc: 1008 classes), 'torchvision' for torchvision's
    IMAGENET1K_V1 (1000 classes; built as torchvision builds it for them: transform_input=True,
    aux_logits=True)."""
    from torchvision.models import inception_v3
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"--inception_weights {path}: not a weight file torch can read ({type(error).__name__})") from None
    classes = tuple(getattr(state.get("fc.weight"), "shape", ())) if isinstance(state, dict) else ()
    if classes == (1008, 2048):
        kind, model = "fid", build_fid_inception()
    elif classes == (1000, 2048):
        kind, model = "torchvision", inception_v3(weights=None, aux_logits=True, transform_input=True,
                                                  init_weights=False)
    else:
        raise UsageError(f"--inception_weights {path}: neither pytorch-fid's {FID_INCEPTION_FILE} nor torchvision's "
                         "inception_v3 IMAGENET1K_V1 weights (expected fc.weight of shape 1008x2048 or 1000x2048)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UsageError(f"--inception_weights {path}: its keys do not match the {kind} Inception-v3") from None
    return model.eval(), kind


def inception_extractor(model, kind, device="cpu", batch_size=50):
    """Inception's 2048 pool features (the input of its last linear layer, as in FID) and its logits
    (1008 or 1000). Images are resized to 299x299 (bilinear) and scaled to [0, 1], then to what the
    weights expect: [-1, 1] for the FID Inception (as pytorch-fid does); ImageNet's mean and std for
    torchvision's (whose transform_input=True then maps them to the [-1, 1] scaling the ported weights
    were trained with). Grayscale images are repeated to 3 channels."""
    model = model.to(device)
    fc, model.fc = model.fc, torch.nn.Identity()  # the network now ends at the pool features
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def extract(images_uint8, desc="features"):
        feats, logits = [], []
        for start in tqdm(range(0, len(images_uint8), batch_size), desc=desc, leave=False):
            x = images_uint8[start:start + batch_size].to(device).float() / 255
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            f = model(2 * x - 1 if kind == "fid" else (x - mean) / std)
            feats.append(f.cpu().double())  # to the CPU first: Apple's MPS has no float64
            logits.append(fc(f).cpu())
        return torch.cat(feats), torch.cat(logits)
    return extract


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FD/FID, KID, IS and precision/recall of generated images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", required=True, help="folder of generated images (class subfolders allowed)")
    p.add_argument("--reference", required=True, help="folder of real images, e.g. a held-out test split")
    p.add_argument("--classifier", default=None, help="checkpoint of tools/classifier.py (required unless "
                   "--features inception); it fixes the image size and channels")
    p.add_argument("--features", default="classifier", choices=("classifier", "inception"))
    p.add_argument("--inception_weights", default=None, help=f"pytorch-fid's {FID_INCEPTION_FILE} (paper-comparable "
                   "FID) or torchvision's inception_v3_google-0cc3c7bd.pth; default: either, from torch's hub cache. "
                   "Never downloaded.")
    p.add_argument("--num_samples", type=int, default=0, help="random samples to score (0 = all)")
    p.add_argument("--num_reference", type=int, default=10000, help="random reference images (0 = all)")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall")
    p.add_argument("--kid_subsets", type=int, default=10)
    p.add_argument("--kid_subset_size", type=int, default=1000)
    p.add_argument("--kid_features", default=None, choices=("standardised", "raw"), help="standardise the features "
                   "with the reference's mean and std before KID (see standardise_features); default: standardised "
                   "for the classifier, raw for Inception (comparable with published KIDs)")
    p.add_argument("--is_splits", type=int, default=10, help="fewer are used when there are < 50 images per split")
    p.add_argument("--cache_dir", default=None, help="where reference features are cached; default: beside "
                   "the classifier (or ./checkpoints)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the reference cache")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--csv", default=None, help="append one row here")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed for the random subsets")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def check_folder(path, flag):
    """A missing or image-less folder -> a one-line error before anything is loaded."""
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: no such folder")
    files = list_images(path)
    if not files:
        raise UsageError(f"{flag} {path}: no image files in it (or in its subfolders)")
    return files


def image_size_of(path):
    """(width, height) of an image file, or None for a file Pillow cannot read (the loader skips those
    with a warning naming them)."""
    try:
        with Image.open(path) as img:
            return img.size
    except OSError:  # includes PIL.UnidentifiedImageError: an empty or broken file
        return None


def check_sample_sizes(files, image_size, source):
    """The samples must already have the size the features are computed at; resizing generated images
    would change the numbers being measured."""
    for path in files:
        size = image_size_of(path)
        if size is not None and size != (image_size, image_size):
            raise UsageError(f"--samples: {path} is {size[0]}x{size[1]}, but {source} works at "
                             f"{image_size}x{image_size}; use a classifier trained at the samples' size")


def load_images(path, flag, image_size, channels, limit, seed):
    """load_folder with our flag names; channels=None learns them from the images, and a mismatch with the
    network's channels is an error (a colour classifier on grayscale images, or the reverse)."""
    images, _, _ = load_folder(path, image_size, None, limit, seed=seed, flag=flag)
    if channels is not None and images.shape[1] != channels:
        kind = {1: "grayscale", 3: "colour"}
        raise UsageError(f"{flag} {path}: {kind[images.shape[1]]} images ({images.shape[1]} channel(s)), but the "
                         f"classifier was trained on {kind[channels]} images ({channels})")
    return images


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


# How utils.fit_image reads an image file. Change it when fit_image changes, so that cached reference
# features computed the old way are not reused (2: 16-bit grayscale scaled to 8 bits, no longer clipped;
# 3: EXIF orientation applied, transparent pixels on white).
PREPROCESSING = "fit_image 3"


def cache_path(args, extractor_name, image_size):
    """<cache_dir>/<reference folder>-<hash of its full path>_<extractor>_<count>_seed<seed>_<size>px.pt"""
    folder = args.cache_dir or (os.path.dirname(os.path.abspath(args.classifier)) if args.classifier
                                else "checkpoints")
    reference = os.path.abspath(args.reference)
    where = hashlib.sha1(reference.encode()).hexdigest()[:8]
    name = (f"{os.path.basename(os.path.normpath(reference))}-{where}_{extractor_name}_"
            f"{args.num_reference or 'all'}_seed{args.seed}_{image_size}px.pt")
    return os.path.join(folder, name)


def folder_fingerprint(files):
    """Changes when files are added, removed or rewritten: their count, total size and newest mtime."""
    stats = [os.stat(f) for f in files]
    return f"{len(stats)}-{sum(s.st_size for s in stats)}-{max(s.st_mtime_ns for s in stats)}"


def reference_features(args, extract, extractor_key, image_size, channels, files):
    """The reference features and their (mu, sigma), from the cache when it matches, else computed and cached."""
    key = dict(extractor=extractor_key, reference=os.path.abspath(args.reference), folder=folder_fingerprint(files),
               num_reference=args.num_reference, seed=args.seed, image_size=image_size,
               preprocessing=PREPROCESSING, device=pick_device(args.device).type)  # GPUs round differently (TF32)
    path = None if args.no_cache else cache_path(args, extractor_key.split(":")[0], image_size)
    if path and os.path.isfile(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("key") == key:
                print(f"reference features from cache {path}")
                return state["features"], state["mu"].numpy(), state["sigma"].numpy(), path
        except Exception:  # a damaged or foreign file: recompute and overwrite it
            pass
    images = load_images(args.reference, "--reference", image_size, channels, args.num_reference, args.seed)
    features, _ = extract(images, desc="reference features")
    mu, sigma = feature_statistics(features)
    if path:
        save_checkpoint(dict(key=key, features=features, mu=torch.from_numpy(mu), sigma=torch.from_numpy(sigma)),
                        path)
        print(f"reference features cached in {path}")
    return features, mu, sigma, path


def class_accuracy(folder, class_names, logits, limit=0, seed=0):
    """The usual protocol for class-conditional samples on MNIST-like data: the fraction the classifier
    reads as the class they were drawn for. sample.py --individual_dir names each file
    sample_<index>_<class name>.png; files without a known class name make this None (an
    unconditional model, or classes the classifier does not know). logits [N x classes] are the
    classifier's for the images load_images(folder, ..., limit, seed) returned: the files are listed
    and drawn here the same way (load_folder), so that row i of logits is file i. Returns (accuracy,
    count) or None."""
    files = [path for path, _ in ImageFolderDataset(folder, 1, flag="--samples").samples]
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
    order = order[:limit] if limit else order
    labels = []
    for i in order.tolist():
        match = re.fullmatch(r"sample_\d+_(.+)\.png", os.path.basename(files[i]))
        if not match or match.group(1) not in class_names:
            return None
        labels.append(class_names.index(match.group(1)))
    predicted = logits.argmax(dim=1)
    return (predicted == torch.tensor(labels)).double().mean().item(), len(order)


def summary_table(result):
    """A Markdown table of the numbers, each row with the image counts it used."""
    n, m = result["num_samples"], result["num_reference"]
    inception = result["features"] == "inception"
    rows = [("FID" if inception else "FD (FID recipe, classifier features)", f"{result['fd']:.4g}", "lower"),
            (f"KID ({result['kid_subsets']} subsets of {result['kid_subset_size']}, "
             f"{result['kid_features']} features)",
             f"{result['kid_mean']:.4g} +- {result['kid_std']:.2g}", "lower"),
            (("Inception Score" if inception else "classifier score (IS recipe)") + f" ({result['is_splits']} split{'s' if result['is_splits'] > 1 else ''})",
             f"{result['is_mean']:.3f} +- {result['is_std']:.3f}", "higher"),
            (f"precision (k={result['k']})", f"{result['precision']:.4f}", "higher"),
            (f"recall (k={result['k']})", f"{result['recall']:.4f}", "higher")]
    if result.get("class_accuracy") is not None:
        rows.append(("class accuracy (the class in each file name)", f"{result['class_accuracy']:.4f}", "higher"))
    lines = ["| metric | value | better | samples | reference |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {value} | {better} | {n} | {m} |" for name, value, better in rows]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.num_samples < 0 or args.num_reference < 0 or args.k < 1 or args.kid_subsets < 1 \
            or args.kid_subset_size < 2 or args.is_splits < 1 or args.batch_size < 1:
        raise UsageError("--num_samples/--num_reference must be >= 0, --k, --kid_subsets, --is_splits and "
                         "--batch_size >= 1, --kid_subset_size >= 2")
    sample_files = check_folder(args.samples, "--samples")
    reference_files = check_folder(args.reference, "--reference")
    seed_everything(args.seed)
    device = pick_device(args.device)
    if args.csv:
        check_csv_table(args.csv, CSV_FIELDS)  # now, not after the features are computed
    if args.json:
        check_output_file(args.json, "--json")
    if args.cache_dir:
        check_output_folder(args.cache_dir, "--cache_dir")

    image_size = channels = None
    if args.classifier:
        if not os.path.isfile(args.classifier):
            raise UsageError(f"--classifier {args.classifier}: no such file; train one with tools/classifier.py")
        classifier, classifier_state = load_classifier(args.classifier)
        image_size, channels = classifier_state["config"]["image_size"], classifier_state["config"]["channels"]
        check_sample_sizes(sample_files, image_size, f"--classifier {args.classifier}")
    elif args.features == "classifier":
        raise UsageError("--classifier is required with --features classifier (train one with tools/classifier.py)")
    else:  # Inception alone: both folders at the samples' own size, then to 299 alike
        sizes = [size for size in map(image_size_of, sample_files) if size is not None]
        if not sizes:
            raise UsageError(f"--samples {args.samples}: none of its image files can be read")
        image_size = sizes[0][0]
        check_sample_sizes(sample_files, image_size, "the first sample")

    if args.features == "inception":
        weights = inception_weights_path(args.inception_weights)
        inception, kind = load_inception(weights)
        extract = inception_extractor(inception, kind, device)
        extractor_key, extractor_text = f"inception:{file_digest(weights)}", f"inception_v3, {kind} weights ({weights})"
        channels = None  # Inception takes either; repeats grayscale to 3 channels
        print(f"features: {INCEPTION_NOTES[kind]}")
    else:
        extract = classifier_extractor(classifier.to(device), device, args.batch_size)
        extractor_key = f"classifier:{file_digest(args.classifier)}"
        extractor_text = (f"the offline classifier {args.classifier} (test accuracy "
                          f"{classifier_state['test_accuracy']:.4f}), 64 features")

    kid_features = args.kid_features or ("raw" if args.features == "inception" else "standardised")
    ref_features, ref_mu, ref_sigma, cache = reference_features(args, extract, extractor_key, image_size, channels,
                                                                reference_files)
    samples = load_images(args.samples, "--samples", image_size, channels, args.num_samples, args.seed)
    sample_features, sample_logits = extract(samples, desc="sample features")
    metrics = compute_metrics(sample_features, sample_logits, ref_features, ref_mu, ref_sigma, k=args.k,
                              kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                              kid_features=kid_features,
                              is_splits=args.is_splits, seed=args.seed)
    accuracy = None
    if args.features == "classifier":
        accuracy = class_accuracy(args.samples, classifier_state["class_names"], sample_logits, args.num_samples,
                                  args.seed)
    metrics["class_accuracy"] = accuracy[0] if accuracy else None
    result = dict(samples=args.samples, reference=args.reference, features=args.features,
                  extractor=extractor_text, classifier=args.classifier,
                  inception_weights=weights if args.features == "inception" else None,
                  feature_dim=int(sample_features.shape[1]), image_size=image_size, seed=args.seed,
                  reference_cache=cache, **metrics)
    if args.features == "inception":
        result["note"] = INCEPTION_NOTES[kind]

    print(f"{metrics['num_samples']} samples from {args.samples} against {metrics['num_reference']} reference "
          f"images from {args.reference}; features: {extractor_text}")
    print(summary_table(result))
    if args.features == "inception":
        print(f"note: {INCEPTION_NOTES[kind]}")
    if args.json:
        write_json(args.json, result)
        print(f"results: {args.json}")
    if args.csv:
        append_csv_rows(args.csv, CSV_FIELDS, [{field: result[field] for field in CSV_FIELDS}])
        print(f"row appended to {args.csv}")
    return result


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
