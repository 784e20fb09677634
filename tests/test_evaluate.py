"""tools/evaluate.py: the sample-quality metrics' defining properties (KID unbiased, IS between 1 and K,
precision and recall on constructed modes, FD zero for a set against itself), then the script end to end
on tiny folders."""
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_one_line_error, make_image_folder, run_script

sys.path.insert(0, str(ROOT / "tools"))
from classifier import build_classifier  # noqa: E402
from evaluate import (classifier_extractor, compute_metrics, evaluate, inception_score,  # noqa: E402
                      kernel_inception_distance, mmd2_unbiased, polynomial_kernel, precision_recall,
                      standardise_features)


def test_kid_is_unbiased_for_equal_distributions_and_positive_for_shifted_ones():
    # Two independent draws of 30 features from the same 8-d Gaussian, 400 times: the unbiased MMD^2
    # averages to 0 (single estimates are negative about half the time); the biased V-statistic, which
    # keeps the diagonal k(x_i, x_i), does not.
    g = torch.Generator().manual_seed(0)
    same, biased, shifted = [], [], []
    for _ in range(400):
        x, y = torch.randn(30, 8, generator=g).double(), torch.randn(30, 8, generator=g).double()
        same.append(mmd2_unbiased(x, y))
        biased.append(float(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
                            - 2 * polynomial_kernel(x, y).mean()))
        shifted.append(mmd2_unbiased(x, y + 1.0))
    same, biased, shifted = map(np.array, (same, biased, shifted))
    standard_error = same.std() / np.sqrt(len(same))
    assert abs(same.mean()) < 3 * standard_error, (same.mean(), standard_error)
    assert (same < 0).mean() > 0.3
    assert biased.mean() > 10 * standard_error
    assert shifted.mean() > 20 * standard_error and (shifted > 0).all()
    # Through the subset-averaging wrapper: subsets of at most the smaller set's size, seeded.
    x, y = torch.randn(40, 8, generator=g), torch.randn(60, 8, generator=g)
    mean, std, size = kernel_inception_distance(x, y, num_subsets=5, subset_size=1000, seed=1)
    assert size == 40 and std >= 0 and (mean, std) == kernel_inception_distance(x, y, 5, 1000, seed=1)[:2]


def test_standardised_kid_does_not_depend_on_the_features_units_and_raw_kid_does():
    # Features like our classifier's: large, with a mean far from 0 and scales that differ per dimension.
    # Standardising with the reference's mean and std undoes any per-feature affine change a*f + b (a > 0)
    # applied to both sets, so KID on standardised features is the same for every a and b; the raw cubic
    # kernel's KID is not (here it grows by orders of magnitude).
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(300, 6, generator=g).double()
    samples = (1.3 * torch.randn(200, 6, generator=g) + 0.4).double()
    scale, shift = torch.tensor([1., 3., 10., 0.5, 20., 7.]).double(), 12.0
    z = standardise_features(reference, reference)
    assert torch.allclose(z.mean(0), torch.zeros(6).double(), atol=1e-12)
    assert torch.allclose(z.std(0), torch.ones(6).double())

    def kid(x, y, standardised):
        if standardised:
            x, y = standardise_features(x, y), standardise_features(y, y)
        return kernel_inception_distance(x, y, num_subsets=4, subset_size=150, seed=0)[0]

    plain, moved = kid(samples, reference, True), kid(samples * scale + shift, reference * scale + shift, True)
    assert plain > 0 and moved == pytest.approx(plain, rel=1e-9)
    assert kid(samples * scale + shift, reference * scale + shift, False) > 100 * kid(samples, reference, False)
    # compute_metrics standardises unless asked for raw features, and says which it used.
    logits = torch.zeros(200, 2)
    metrics = compute_metrics(samples * scale + shift, logits, reference * scale + shift, kid_subsets=4,
                              kid_subset_size=150, is_splits=1)
    assert metrics["kid_features"] == "standardised" and metrics["kid_mean"] == pytest.approx(plain, rel=1e-9)
    raw = compute_metrics(samples, logits, reference, kid_subsets=4, kid_subset_size=150, kid_features="raw",
                          is_splits=1)
    assert raw["kid_features"] == "raw" and raw["kid_mean"] == pytest.approx(kid(samples, reference, False))
    with pytest.raises(ValueError, match="kid_features"):
        compute_metrics(samples, logits, reference, kid_features="standardized", is_splits=1)


def test_inception_score_is_k_for_confident_uniform_predictions_and_1_for_identical_ones():
    classes = 10
    confident = 100.0 * torch.nn.functional.one_hot(torch.arange(200) % classes, classes).float()
    mean, std = inception_score(confident, splits=2)  # each split holds every class equally often
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    identical = torch.randn(1, classes).repeat(200, 1)  # p(y|x) = p(y): every KL term is 0
    assert inception_score(identical, splits=4)[0] == pytest.approx(1.0, abs=1e-12)


def test_precision_and_recall_on_identical_sets_and_on_half_of_the_modes():
    g = torch.Generator().manual_seed(0)
    centres = 30 * torch.randn(8, 2, generator=g)  # 8 well-separated modes in 2-d

    def draw(modes):
        return (centres[modes].repeat_interleave(200, 0) + torch.randn(200 * len(modes), 2, generator=g)).double()

    real = draw(range(8))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    # A fresh draw from every mode: realistic and covering (a few tail points fall outside the k-NN balls).
    precision, recall = precision_recall(draw(range(8)), real, k=3)
    assert precision > 0.95 and recall > 0.95, (precision, recall)
    # Samples from only the first 4 modes: just as realistic, but half of the data is not covered.
    precision, recall = precision_recall(draw(range(4)), real, k=3)
    assert precision > 0.95, precision
    assert 0.45 < recall <= 0.5, recall


def test_fd_of_a_set_against_itself_is_zero_and_grows_with_noise():
    torch.manual_seed(0)
    extract = classifier_extractor(build_classifier(dict(image_size=16, channels=1, num_classes=3)))
    images = (torch.rand(200, 1, 16, 16) * 255).to(torch.uint8)
    itself = evaluate(images, images, extract, kid_subsets=3)
    assert abs(itself["fd"]) < 1e-6 and itself["precision"] == itself["recall"] == 1.0
    assert itself["num_samples"] == itself["num_reference"] == 200
    results = []
    for noise in (10, 40, 120):
        noisy = (images.float() + noise * torch.randn_like(images.float())).clamp(0, 255).to(torch.uint8)
        results.append(evaluate(noisy, images, extract, kid_subsets=3))
    fds = [r["fd"] for r in results]
    assert 0 < fds[0] < fds[1] < fds[2], fds
    assert results[0]["kid_mean"] < results[2]["kid_mean"]


def make_flat_folder(root, count, size=16, mode="RGB", seed=1):
    """Generated images as sample.py --individual_dir writes them: one flat folder of size x size PNGs."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(count):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"sample_{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 16x16 classifier trained for one epoch on a tiny two-class folder, and a folder of 16x16 'samples'."""
    root = tmp_path_factory.mktemp("evaluate")
    reference = make_image_folder(root / "pets", per_class=10)
    run_script("tools/classifier.py", "--train_path", reference, "--test_path", reference, "--out",
               root / "classifier.pt", "--image_size", "16", "--epochs", "1", "--batch_size", "8", "--device", "cpu",
               cwd=root)
    return root, reference, make_flat_folder(root / "samples", 12)


def test_evaluate_script_writes_json_and_csv_and_reuses_the_reference_cache(tiny):
    root, reference, samples = tiny
    args = ["--samples", samples, "--reference", reference, "--classifier", root / "classifier.pt",
            "--cache_dir", root / "cache", "--num_reference", "15", "--device", "cpu"]
    first = run_script("tools/evaluate.py", *args, "--json", root / "results.json", "--csv", root / "results.csv",
                       cwd=root)
    assert "reference features cached in" in first.stdout and "from cache" not in first.stdout
    assert "12 samples" in first.stdout and "15 reference" in first.stdout and "| 12 | 15 |" in first.stdout
    with open(root / "results.json") as f:
        result = json.load(f)
    assert result["num_samples"] == 12 and result["num_reference"] == 15 and result["feature_dim"] == 64
    assert result["features"] == "classifier" and result["samples"] == str(samples)
    for key in ("fd", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"):
        assert np.isfinite(result[key]), key
    # Two classes: the classifier score lies between 1 and 2.
    assert result["fd"] > -1e-6 and 1 - 1e-6 <= result["is_mean"] <= 2 + 1e-6 and 0 <= result["precision"] <= 1
    assert result["kid_subset_size"] == 12 and result["is_splits"] == 1
    assert result["kid_features"] == "standardised" and "standardised features" in first.stdout

    second = run_script("tools/evaluate.py", *args, "--num_samples", "8", "--csv", root / "results.csv",
                        cwd=root)
    assert f"reference features from cache {result['reference_cache']}" in second.stdout
    assert "8 samples" in second.stdout
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["num_samples"], r["num_reference"]) for r in rows] == [("12", "15"), ("8", "15")]
    assert float(rows[0]["fd"]) == pytest.approx(result["fd"], rel=1e-4)
    # Features cached from images read the old way (before 16-bit grayscale was scaled) are computed again.
    cached = torch.load(result["reference_cache"], weights_only=True)
    cached["key"]["preprocessing"] = "fit_image 1"
    torch.save(cached, result["reference_cache"])
    assert "reference features cached in" in run_script("tools/evaluate.py", *args, cwd=root).stdout
    third = run_script("tools/evaluate.py", *args, "--no_cache", "--kid_features", "raw", "--json",
                       root / "raw.json", cwd=root)
    assert "cache" not in third.stdout and "raw features" in third.stdout
    with open(root / "raw.json") as f:
        raw = json.load(f)
    assert raw["kid_features"] == "raw" and raw["kid_mean"] != pytest.approx(result["kid_mean"])
    assert raw["fd"] == pytest.approx(result["fd"], rel=1e-9)  # only KID changes
    # A CSV written by another layout (an older version's) is refused rather than appended to misaligned.
    with open(root / "old.csv", "w") as f:
        f.write("samples,reference,fd\nx,y,1.0\n")
    refused = run_script("tools/evaluate.py", *args, "--csv", root / "old.csv", cwd=root, check=False)
    assert_one_line_error(refused, str(root / "old.csv"), "new file name")
    assert "FD" not in refused.stdout  # refused before any measuring


def test_evaluate_script_bad_input_gives_one_line_errors(tiny, tmp_path, monkeypatch):
    root, reference, samples = tiny
    classifier = root / "classifier.pt"

    def run(*args):
        return run_script("tools/evaluate.py", *args, "--device", "cpu", "--no_cache", cwd=tmp_path, check=False)

    assert_one_line_error(run("--samples", tmp_path / "nowhere", "--reference", reference, "--classifier",
                              classifier), "--samples", "no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("--samples", samples, "--reference", tmp_path / "empty", "--classifier", classifier),
                          "--reference", "no image files")
    assert_one_line_error(run("--samples", samples, "--reference", reference, "--classifier", tmp_path / "no.pt"),
                          "--classifier", "no such file")
    # train.py's checkpoints are not the offline classifier: each is named for what it is.
    torch.save(dict(model_config={}, task="classifier", ema={}), tmp_path / "noisy.pt")
    torch.save(dict(model_config={}, task="diffusion", ema={}), tmp_path / "model.pt")
    for path, kind in ((tmp_path / "noisy.pt", "a noisy classifier"), (tmp_path / "model.pt", "a diffusion model")):
        assert_one_line_error(run("--samples", samples, "--reference", reference, "--classifier", path),
                              f"--classifier {path}: {kind}", "tools/classifier.py")
    big = make_flat_folder(tmp_path / "big", 4, size=24)
    assert_one_line_error(run("--samples", big, "--reference", reference, "--classifier", classifier),
                          "--samples", "24x24", "16x16")
    gray = make_flat_folder(tmp_path / "gray", 4, mode="L")
    assert_one_line_error(run("--samples", gray, "--reference", reference, "--classifier", classifier),
                          "--samples", "grayscale", "colour")
    # Inception: never downloaded; with an empty hub cache, say where the file goes.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert_one_line_error(run("--samples", samples, "--reference", reference, "--classifier", classifier,
                              "--features", "inception"), "inception_v3_google-0cc3c7bd.pth",
                          str(tmp_path / "torch_home" / "hub" / "checkpoints"), "--inception_weights")
    # A file that is not a checkpoint names the script that writes the classifier, not train.py.
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 half a zip")
    assert_one_line_error(run("--samples", samples, "--reference", reference, "--classifier", tmp_path / "broken.pt"),
                          "--classifier", "not a checkpoint", "written by tools/classifier.py")
    # Output paths are checked before any features are computed.
    (tmp_path / "adir.json").mkdir()
    assert_one_line_error(run("--samples", samples, "--reference", reference, "--classifier", classifier,
                              "--json", tmp_path / "adir.json"), "--json", "a folder of that name")
    (tmp_path / "afile").write_text("x")
    result = run_script("tools/evaluate.py", "--samples", samples, "--reference", reference, "--classifier",
                        classifier, "--device", "cpu", "--cache_dir", tmp_path / "afile", cwd=tmp_path, check=False)
    assert_one_line_error(result, "--cache_dir", "is a file")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    assert_one_line_error(run("--samples", samples, "--reference", reference, "--features", "inception",
                              "--inception_weights", tmp_path / "other.pth"), "--inception_weights",
                          "pt_inception-2015-12-05-6726825d.pth", "1008x2048")


@pytest.mark.parametrize("flags,fragments", [
    (["--image_size", "2"], ("--image_size 2", "4 or more")),      # a pooling traceback
    (["--lr", "inf"], ("--lr inf", "positive")),                  # trained to NaN weights and saved them
    (["--lr", "-1"], ("--lr -1.0", "positive")),
    (["--out", "afile/c.pt"], ("--out afile/c.pt", "is a file")),  # failed after the training
])
def test_classifier_tool_refuses_bad_flags_before_training(tiny, tmp_path, flags, fragments):
    _, reference, _ = tiny
    (tmp_path / "afile").write_text("x")
    common = ["--train_path", reference, "--test_path", reference, "--out", "c.pt", "--image_size", "16",
              "--epochs", "1", "--device", "cpu"]
    result = run_script("tools/classifier.py", *common, *flags, cwd=tmp_path, check=False)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "c.pt").exists()


def test_tools_that_read_image_folders_say_how_to_turn_an_npz_into_one(tiny, tmp_path):
    """Only train.py reads .npz arrays; the tools that need a folder say so, and how to export one."""
    _, reference, _ = tiny
    np.savez(tmp_path / "tiny.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4, np.int64))
    result = run_script("tools/classifier.py", "--train_path", "tiny.npz", "--test_path", reference, "--out", "c.pt",
                        cwd=tmp_path, check=False)
    assert_one_line_error(result, "--train_path tiny.npz: an .npz file", "tools/export_dataset.py tiny.npz")
    (tmp_path / "one.png").write_bytes((reference / "cat" / sorted(os.listdir(reference / "cat"))[0]).read_bytes())
    result = run_script("tools/classifier.py", "--train_path", "one.png", "--test_path", reference, "--out", "c.pt",
                        cwd=tmp_path, check=False)
    assert_one_line_error(result, "--train_path one.png: a file, not a folder")
    assert ".npz" not in result.stderr


def test_an_unreadable_sample_is_skipped_not_a_traceback(tiny, tmp_path):
    """The size check reads every sample's header: an empty file there is left to the loader, which
    skips it with a warning naming it, as training does."""
    root, reference, samples = tiny
    shutil.copytree(samples, tmp_path / "samples")
    (tmp_path / "samples" / "sample_99999.png").write_bytes(b"")
    result = run_script("tools/evaluate.py", "--samples", tmp_path / "samples", "--reference", reference,
                        "--classifier", root / "classifier.pt", "--device", "cpu", "--no_cache", cwd=tmp_path)
    assert "| 12 |" in result.stdout  # 12 samples scored, not 13 (the warning is silenced under the tests)


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_class_accuracy_reads_the_class_from_sample_py_file_names(tmp_path):
    """sample.py names files sample_<i>_<class>.png; a stand-in classifier that calls dark images 'cat'
    and bright ones 'dog' reads 4 of these 5 as named (the bright 'cat' is the miss). The labels must
    line up with the logits of the images load_images drew, also when --num_samples takes a random
    subset and an unreadable file sits in the folder (which the loader skips)."""
    from evaluate import class_accuracy, load_images
    folder = tmp_path / "samples"
    folder.mkdir()
    drawn_as = {0: "cat", 255: "dog", 250: "dog", 245: "cat", 10: "cat"}  # each image's grey level -> its name
    for i, (value, name) in enumerate(drawn_as.items()):
        Image.new("L", (8, 8), value).save(folder / f"sample_{i:05d}_{name}.png")
    (folder / "sample_00002_bad.png").write_bytes(b"not a png")
    brightness = lambda images: images.float().mean(dim=(1, 2, 3))
    read_as = lambda images: torch.stack([128 - brightness(images), brightness(images) - 128], dim=1)  # [cat, dog]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        everything = load_images(folder, "--samples", 8, 1, 0, seed=0)
    assert class_accuracy(folder, ["cat", "dog"], read_as(everything)) == (0.8, 5)
    assert class_accuracy(folder, ["bird", "dog"], read_as(everything)) is None  # 'cat' unknown
    for seed in range(4):  # 3 of the 5, drawn as load_images draws them
        subset = load_images(folder, "--samples", 8, 1, 3, seed=seed)
        right = [("dog" if level > 128 else "cat") == drawn_as[int(level)] for level in brightness(subset).tolist()]
        assert class_accuracy(folder, ["cat", "dog"], read_as(subset), 3, seed) == (sum(right) / 3, 3)
    Image.new("L", (8, 8), 0).save(folder / "sample_00009.png")  # an unconditional sample
    assert class_accuracy(folder, ["cat", "dog"], read_as(load_images(folder, "--samples", 8, 1, 0, 0))) is None


def test_fid_inception_pools_like_the_tensorflow_graph_and_reads_pytorch_fid_weight_files(tiny, tmp_path):
    """pytorch-fid's weight file holds the TensorFlow FID graph, which differs from torchvision's
    Inception-v3 in its pooling branches only: average pools that ignore the zero padding in
    Mixed_5b-d, 6b-e and 7b, a max pool in Mixed_7c. The patched blocks compute exactly that (and differ
    from torchvision's where the padding counts); the other branches are torchvision's. A file with the
    layout of pytorch-fid's (1008 classes, no auxiliary classifier; random weights here, as the real
    file is 92 MB) is recognised and used end to end."""
    import torch.nn.functional as F
    from evaluate import INCEPTION_NOTES, build_fid_inception, load_inception
    torch.manual_seed(0)
    model = build_fid_inception().eval()
    with torch.no_grad():
        for name, in_channels, pool_channels, pool in (
                ("Mixed_5b", 192, 32, "average"), ("Mixed_6e", 768, 192, "average"),
                ("Mixed_7b", 1280, 192, "average"), ("Mixed_7c", 2048, 192, "max")):
            block, x = getattr(model, name), torch.randn(1, in_channels, 8, 8)
            out = block(x)
            if pool == "max":
                pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            torchvision_pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)  # counts the padding
            assert torch.equal(out[:, -pool_channels:], block.branch_pool(pooled)), name
            assert not torch.allclose(out[:, -pool_channels:], block.branch_pool(torchvision_pooled)), name
            torchvision_out = torch.cat(type(block)._forward(block, x), dim=1)
            assert torch.equal(out[:, :-pool_channels], torchvision_out[:, :-pool_channels]), name
    state = model.state_dict()
    assert state["fc.weight"].shape == (1008, 2048) and not any(k.startswith("AuxLogits") for k in state)
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    loaded, kind = load_inception(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))
    assert kind == "fid" and torch.equal(loaded.state_dict()["fc.weight"], state["fc.weight"])

    root, reference, samples = tiny
    result = run_script("tools/evaluate.py", "--samples", samples, "--reference", reference, "--features",
                        "inception", "--inception_weights", tmp_path / "pt_inception-2015-12-05-6726825d.pth",
                        "--num_reference", "10", "--no_cache", "--json", tmp_path / "r.json", "--device", "cpu",
                        cwd=tmp_path)
    assert INCEPTION_NOTES["fid"] in result.stdout and "FID" in result.stdout
    with open(tmp_path / "r.json") as f:
        numbers = json.load(f)
    assert numbers["feature_dim"] == 2048 and numbers["num_samples"] == 12 and np.isfinite(numbers["fd"])
    assert "fid weights" in numbers["extractor"]
