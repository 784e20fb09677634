"""tools/classifier.py, tools/sampler_sweep.py and tools/nll.py: the Frechet distance's mathematics and
each tool end to end on tiny data."""
import csv
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (ROOT, TINY_TRAIN_FLAGS, assert_one_line_error, correlation, make_image_folder, randomise_zero_inits,
                      record_step_noise, run_script)

sys.path.insert(0, str(ROOT / "tools"))
from classifier import build_classifier, features_and_logits, feature_statistics, frechet_distance, sqrtm_psd  # noqa: E402


def test_matrix_square_root_of_known_and_random_psd_matrices():
    assert np.allclose(sqrtm_psd(np.diag([4.0, 9.0])), np.diag([2.0, 3.0]))
    rotation = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    a = rotation @ np.diag([16.0, 1.0]) @ rotation.T
    assert np.allclose(sqrtm_psd(a), rotation @ np.diag([4.0, 1.0]) @ rotation.T)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(20, 20))
    psd = m @ m.T
    root = sqrtm_psd(psd)
    assert np.allclose(root @ root, psd) and np.allclose(root, root.T)


def test_frechet_distance_known_cases():
    # 1-D: N(0, 1) vs N(1, 4): (0 - 1)^2 + 1 + 4 - 2 sqrt(1 * 4) = 2
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(8, 8))
    sigma, mu = m @ m.T, rng.normal(size=8)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    assert frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(8.0)  # a pure shift costs |shift|^2


def test_frechet_distance_of_images_is_near_zero_for_the_same_set_and_grows_with_noise():
    torch.manual_seed(0)
    classifier = build_classifier(dict(image_size=16, channels=1, num_classes=3))
    images = (torch.rand(300, 1, 16, 16) * 255).to(torch.uint8)
    stats = feature_statistics(features_and_logits(classifier, images)[0])
    assert abs(frechet_distance(*stats, *stats)) < 1e-9
    distances = []
    for noise in (10, 40, 120):
        noisy = (images.float() + noise * torch.randn_like(images.float())).clamp(0, 255).to(torch.uint8)
        distances.append(frechet_distance(*feature_statistics(features_and_logits(classifier, noisy)[0]), *stats))
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_features_take_uint8_images_and_fewer_images_than_features_are_flagged():
    """Float images in [0, 1] would read as near-black; N <= D leaves a singular covariance."""
    import warnings
    classifier = build_classifier(dict(image_size=8, channels=1, num_classes=2))
    with pytest.raises(TypeError, match="uint8"):
        features_and_logits(classifier, torch.rand(2, 1, 8, 8))
    with pytest.warns(UserWarning, match="64 images of 64 features"):
        feature_statistics(torch.randn(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_statistics(torch.randn(65, 64))


def test_a_classifier_near_chance_is_flagged(tmp_path):
    from classifier import load_classifier
    config = dict(image_size=8, channels=1, num_classes=3)
    state = dict(classifier=build_classifier(config).state_dict(), config=config, class_names=["a", "b", "c"])
    torch.save(dict(state, test_accuracy=0.4), tmp_path / "weak.pt")
    with pytest.warns(UserWarning, match="test accuracy 0.40, near chance"):
        load_classifier(str(tmp_path / "weak.pt"))
    torch.save(dict(state, test_accuracy=0.9), tmp_path / "good.pt")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_classifier(str(tmp_path / "good.pt"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny diffusion checkpoint and a tiny classifier on the same generated folder (16x16, 2 classes)."""
    root = tmp_path_factory.mktemp("quality")
    folder = make_image_folder(root / "pets", per_class=10)
    run_script("train.py", "--dataset_path", folder, *TINY_TRAIN_FLAGS, "--max_steps", "2", "--sample_every", "0",
               cwd=root)
    result = run_script("tools/classifier.py", "--train_path", folder, "--test_path", folder, "--out",
                        root / "classifier.pt", "--image_size", "16", "--epochs", "1", "--batch_size", "8", cwd=root)
    assert "test accuracy" in result.stdout
    return root, folder


def test_classifier_checkpoint_describes_itself(trained):
    root, _ = trained
    state = torch.load(root / "classifier.pt", map_location="cpu", weights_only=True)
    assert state["config"] == dict(image_size=16, channels=3, num_classes=2)
    assert state["class_names"] == ["cat", "dog"] and 0.0 <= state["test_accuracy"] <= 1.0 and state["seed"] == 0


def test_classifier_out_never_replaces_a_training_run(trained, tmp_path):
    """--out may replace an earlier classifier of this tool, checked before training; a train.py run
    (whose --task classifier run is also named <data>_classifier.pt) or a folder is refused."""
    root, folder = trained
    common = ["--train_path", folder, "--test_path", folder, "--image_size", "16", "--epochs", "1", "--batch_size", "8"]
    run_file = root / "checkpoints" / "pets.pt"
    before = run_file.read_bytes()
    for out, fragment in ((run_file, "is not a classifier written by this tool"), (tmp_path, "is a folder")):
        refused = run_script("tools/classifier.py", *common, "--out", out, cwd=root, check=False)
        assert_one_line_error(refused, f"--out {out}", fragment)
    assert run_file.read_bytes() == before
    again = tmp_path / "again.pt"
    shutil.copy(root / "classifier.pt", again)
    assert "replacing the earlier classifier" in run_script("tools/classifier.py", *common, "--out", again, cwd=root).stdout


def test_sampler_sweep_writes_rows_and_a_plot(trained):
    root, folder = trained
    csv_path, plot_path = root / "sweep.csv", root / "sweep.png"
    args = ["--ckpt", root / "checkpoints" / "pets_ema.pt", "--classifier", root / "classifier.pt",
            "--reference_path", folder, "--steps", "2", "20", "--num_samples", "8", "--batch_size", "5",
            "--csv", csv_path, "--plot", plot_path, "--grids", root / "grids", "--device", "cpu"]
    result = run_script("tools/sampler_sweep.py", *args, cwd=root)
    assert "real images (in the samples' class proportions): FD" in result.stdout
    run_script("tools/sampler_sweep.py", *args, "--samplers", "ddim", "--run_name", "again", cwd=root)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["sampler"], r["steps"]) for r in rows] == [
        ("pets_ema", "real", "0"), ("pets_ema", "ddpm", "2"), ("pets_ema", "ddpm", "20"), ("pets_ema", "ddim", "2"),
        ("pets_ema", "ddim", "20"), ("again", "real", "0"), ("again", "ddim", "2"), ("again", "ddim", "20")]
    assert all(float(r["fd"]) >= -1e-6 and r["num_samples"] == "8" for r in rows)
    assert plot_path.is_file() and (root / "grids" / "pets_ema_ddim_20.png").is_file()
    # A --csv that cannot take these rows fails before any sampling (not after it, losing the measurements).
    other = root / "other_table.csv"
    other.write_text("run,minutes\n")
    swapped = [other if a == csv_path else root / "grids_refused" if a == root / "grids" else a for a in args]
    refused = run_script("tools/sampler_sweep.py", *swapped, cwd=root, check=False)
    assert_one_line_error(refused, "--csv", "other_table.csv: its columns are not the ones written now")
    assert "FD" not in refused.stdout and not (root / "grids_refused").exists()
    # A reference folder with other class folders than the model's classes: label k would name another class.
    import shutil
    extra = root / "pets_plus"
    shutil.copytree(folder, extra, dirs_exist_ok=True)
    (extra / "zebra").mkdir(exist_ok=True)
    shutil.copy(next((extra / "cat").iterdir()), extra / "zebra" / "z.png")
    swapped = [extra if a == folder else root / "grids_refused" if a == root / "grids" else a for a in args]
    assert_one_line_error(run_script("tools/sampler_sweep.py", *swapped, cwd=root, check=False), "--reference_path",
                          "its class folders (cat, dog, zebra) are not the model's classes (cat, dog)")
    # --save_samples: every sample as a PNG in class subfolders, for tools/evaluate.py
    run_script("tools/sampler_sweep.py", *args, "--samplers", "ddim", "--steps", "2", "--run_name", "saved",
               "--save_samples", root / "saved", cwd=root)
    saved = root / "saved" / "saved_ddim_2"
    assert sorted(p.name for p in saved.iterdir()) == ["cat", "dog"]
    files = sorted(saved.glob("*/*.png"))
    assert len(files) == 8 and len(list((saved / "cat").glob("*.png"))) == 4
    assert Image.open(files[0]).size == (16, 16)
    floor = root / "saved" / "saved_real"  # the floor's real images, as the sweep read them, beside the samples
    assert len(list(floor.glob("cat/*.png"))) == 4 and len(list(floor.glob("dog/*.png"))) == 4
    assert Image.open(next(floor.glob("cat/*.png"))).size == (16, 16)
    result = run_script("tools/evaluate.py", "--samples", saved, "--reference", folder, "--classifier",
                        root / "classifier.pt", "--device", "cpu", cwd=root)
    assert "KID" in result.stdout
    result = run_script("tools/sampler_sweep.py", *args[:-2], "--steps", "21", cwd=root, check=False)
    assert_one_line_error(result, "--steps [21]")


def test_guidance_sweep_scores_each_scale_with_the_offline_classifier(trained, tmp_path):
    """guidance_sweep.py --eval_classifier: one row per scale, with FD and class accuracy against held-out
    images; the classifier and the reference folder must have the model's classes."""
    root, folder = trained
    common = ["--ckpt", root / "checkpoints" / "pets_ema.pt", "--scales", "0", "2", "--per_class", "2",
              "--steps", "2", "--out", tmp_path / "g.png", "--eval_classifier", root / "classifier.pt",
              "--reference_path", folder, "--num_reference", "10"]
    run_script("tools/guidance_sweep.py", *common, "--csv", tmp_path / "g.csv", cwd=tmp_path)
    with open(tmp_path / "g.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["scale"] for r in rows] == ["0", "2"] and all(float(r["fd"]) >= -1e-6 for r in rows)
    assert all(0.0 <= float(r["class_accuracy"]) <= 1.0 and r["num_samples"] == "4" for r in rows)
    # One class drawn: the reference keeps only that class's real images (the other class would count as missing).
    one = run_script("tools/guidance_sweep.py", *common, "--classes", "1", "--per_class", "4", "--show", "2",
                     "--csv", tmp_path / "g1.csv", cwd=tmp_path)
    assert "real images whose classes are drawn here" in one.stdout
    shutil.copytree(folder, tmp_path / "more")
    (tmp_path / "more" / "zebra").mkdir()
    shutil.copy(next((tmp_path / "more" / "cat").iterdir()), tmp_path / "more" / "zebra" / "z.png")
    swapped = [tmp_path / "more" if a == folder else a for a in common]
    assert_one_line_error(run_script("tools/guidance_sweep.py", *swapped, "--csv", tmp_path / "g2.csv", cwd=tmp_path,
                                     check=False), "are not the model's classes")


def test_sampler_sweep_gives_ddim_one_row_per_eta_and_spacing(trained):
    """--eta and --spacing multiply the DDIM rows; eta 0 with uniform spacing keeps the plain "ddim" label, and
    the other settings draw different images from the same starting noise."""
    root, folder = trained
    csv_path = root / "sweep_eta.csv"
    run_script("tools/sampler_sweep.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--classifier",
               root / "classifier.pt", "--reference_path", folder, "--samplers", "ddim", "--steps", "5",
               "--eta", "0", "1", "--spacing", "uniform", "quadratic", "--num_samples", "8", "--csv", csv_path,
               "--grids", root / "grids_eta", "--device", "cpu", cwd=root)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["sampler"] for r in rows] == ["real", "ddim", "ddim eta=0 quadratic", "ddim eta=1 uniform",
                                            "ddim eta=1 quadratic"]
    assert (root / "grids_eta" / "pets_ema_ddim_eta=1_quadratic_5.png").is_file()
    run_script("tools/sampler_sweep.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--classifier",
               root / "classifier.pt", "--reference_path", folder, "--samplers", "ddim", "--steps", "5",
               "--num_samples", "8", "--csv", csv_path, "--amp", "bf16", "--device", "cpu", "--run_name", "my run",
               "--grids", root / "grids_amp", cwd=root)
    with open(csv_path) as f:
        assert [r["sampler"] for r in csv.DictReader(f)][-1] == "ddim (bf16)"
    assert [p.name for p in (root / "grids_amp").iterdir()] == ["my_run_ddim_bf16_5.png"]  # no spaces or brackets
    # draw_samples hands eta and spacing to DDIM: from the same x_T, each setting gives other images.
    from ddpm import GaussianDiffusion
    from model import build_model
    from sampler_sweep import draw_samples
    model = randomise_zero_inits(build_model(dict(image_size=8, base_channels=8, channel_mults=[1], num_res_blocks=1)))
    diffusion, noise = GaussianDiffusion(timesteps=20), torch.randn(4, 3, 8, 8) * 0.3
    images = [draw_samples(diffusion, model, "ddim", 5, noise, eta=eta, spacing=spacing)[0]
              for eta, spacing in ((0.0, "uniform"), (0.0, "quadratic"), (1.0, "uniform"))]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])


def test_the_floor_has_the_samples_class_proportions_and_is_disjoint_from_the_reference():
    from sampler_sweep import split_floor_and_reference
    from utils import UsageError
    real_labels = torch.tensor([0, 0, 1, 2, 0, 1, 1, 2, 0, 2, 2, 1])
    sample_labels = torch.arange(6) % 3                            # two samples of each class
    floor, reference = split_floor_and_reference(real_labels, 6, sample_labels)
    assert torch.bincount(real_labels[floor]).tolist() == [2, 2, 2]
    assert floor.tolist() == [0, 1, 2, 3, 5, 7]                    # the first two of each class in the shuffled order
    assert sorted(floor.tolist() + reference.tolist()) == list(range(12))  # disjoint, and nothing left out
    floor, reference = split_floor_and_reference(real_labels, 5)  # unconditional: the first five
    assert floor.tolist() == [0, 1, 2, 3, 4] and reference.tolist() == list(range(5, 12))
    with pytest.raises(UsageError, match="--reference_path: 4 images of class 0; the floor needs 5"):
        split_floor_and_reference(real_labels, 15, torch.arange(15) % 3)


def test_reference_class_shift_measures_how_far_the_floor_moved_the_references_proportions():
    from sampler_sweep import reference_class_shift, split_floor_and_reference
    real_labels = torch.tensor([0] * 60 + [1] * 40)                   # shares 0.6 and 0.4
    floor, reference = split_floor_and_reference(real_labels, 20, torch.arange(20) % 2)  # 10 of each class
    assert reference_class_shift(real_labels, reference) == pytest.approx((0.4 - 30 / 80) / 0.4)  # class 1: 0.375
    floor, reference = split_floor_and_reference(real_labels, 10, torch.tensor([0] * 6 + [1] * 4))
    assert reference_class_shift(real_labels, reference) == pytest.approx(0.0)  # the floor in the data's proportions


def test_arrays_are_fitted_like_image_files_so_they_compare_with_a_folder(tmp_path):
    """An .npz's digits and a peer's saved samples must be read the way the reference folder's PNGs are
    (28 -> 32 resized, not padded): the same pixels, whichever way they come in."""
    sys.path.insert(0, str(ROOT / "tools"))
    from classifier import load_folder
    from time_to_quality import read_peer
    from utils import fit_images
    digits = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    for i, digit in enumerate(digits):
        (tmp_path / "ref" / "0").mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit).save(tmp_path / "ref" / "0" / f"{i}.png")
    from_files, _, _ = load_folder(tmp_path / "ref", 32, 1, seed=0)
    shuffled = torch.randperm(3, generator=torch.Generator().manual_seed(0))  # the order load_folder draws them in
    from_files = from_files[torch.argsort(shuffled)]                          # back to 0.png, 1.png, 2.png
    fitted = fit_images(digits, 32)
    assert fitted.shape == (3, 1, 32, 32) and fitted.dtype == torch.uint8
    assert torch.equal(fitted, from_files)
    assert fitted[:, :, :2].float().mean() > 20  # resized to the border, not padded with 2 black rows
    np.savez(tmp_path / "peer.npz", x=digits, train_s=60.0, steps=5)
    name, images, seconds, steps = read_peer(f"p={tmp_path / 'peer.npz'}", 32, 1)
    assert (name, seconds, steps) == ("p", 60.0, 5) and torch.equal(images, from_files)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_draw_samples_adds_noise_independent_of_the_starting_noise(monkeypatch, sampler, eta):
    """The tools draw x_T from a generator seeded with --seed; the per-step z must not repeat it (with the
    same seed in torch's global generator, the first z was x_T itself)."""
    from ddpm import GaussianDiffusion
    from model import build_model
    from sampler_sweep import draw_samples
    model = randomise_zero_inits(build_model(dict(image_size=8, base_channels=8, channel_mults=[1], num_res_blocks=1)))
    diffusion = GaussianDiffusion(timesteps=10)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    drawn = record_step_noise(monkeypatch)
    draw_samples(diffusion, model, sampler, 10, x_T, seed=0, eta=eta)
    assert len(drawn) >= 9 and all(z.shape == x_T.shape for z in drawn)
    assert abs(correlation(drawn[0], x_T)) < 0.2  # 192 values


@pytest.mark.filterwarnings("ignore:Frechet distance from", "ignore:Data has no positive values",
                            "ignore:.*near chance")  # tiny counts, a one-epoch classifier
def test_time_to_quality_scores_checkpoints_and_peers_on_one_time_axis(trained):
    """tools/time_to_quality.py: a checkpoint's minutes come from the train_seconds it records, a peer's from
    its .npz; every set is scored against the same reference, and one-line errors name the bad input."""
    root, folder = trained
    ckpt = root / "checkpoints" / "pets_ema.pt"
    peer = root / "peer.npz"
    np.savez(peer, x=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), train_s=90.0, steps=7)
    csv_path, plot_path = root / "ttq.csv", root / "plots" / "ttq.png"  # a folder it makes
    args = ["--classifier", root / "classifier.pt", "--reference_path", folder, "--num_samples", "8",
            "--num_reference", "10", "--steps", "3", "--batch_size", "5", "--csv", csv_path, "--device", "cpu"]
    run_script("tools/time_to_quality.py", "--ckpt", ckpt, "--peer", f"noise={peer}", *args, "--plot", plot_path,
               "--grids", root / "ttq_grids", cwd=root)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["real", "ours", "noise"]
    seconds = torch.load(ckpt, map_location="cpu", weights_only=True)["train_seconds"]
    assert float(rows[1]["minutes"]) == pytest.approx(seconds / 60, abs=0.01) and rows[1]["step"] == "2"
    assert (rows[2]["minutes"], rows[2]["step"]) == ("1.50", "7")
    assert all(r["num_samples"] == "8" and float(r["fd"]) >= -1e-6 and 0 <= float(r["rarest_class"]) <= 0.5
               for r in rows)
    assert float(rows[0]["class_accuracy"]) >= 0 and rows[2]["class_accuracy"] == "nan"  # a peer has no labels
    assert plot_path.is_file() and (root / "ttq_grids" / "ours_2.png").is_file()
    # --labels none: the "no label" input that label dropout trained (the fair match for unconditional peers)
    run_script("tools/time_to_quality.py", "--ckpt", ckpt, "--labels", "none", "--run_name", "no label", *args, cwd=root)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows[3:]] == ["real", "no label"] and rows[4]["class_accuracy"] == "nan"
    # What reaches the sampler: random labels of the model's classes by default, None (the "no label" row) with none.
    import time_to_quality
    seen = []
    real_draw = time_to_quality.draw_samples
    time_to_quality.draw_samples = lambda *a, **k: (seen.append(a[5]), real_draw(*a, **k))[1]
    try:
        for labels in ("random", "none"):
            time_to_quality.main(["--ckpt", str(ckpt), "--labels", labels, *map(str, args)])
    finally:
        time_to_quality.draw_samples = real_draw
    assert seen[0].shape == (8,) and 0 <= seen[0].min() and seen[0].max() < 2 and seen[1] is None
    # --amp bf16: our network under autocast, and the row says so; the floor and a peer's saved samples do not
    rows = time_to_quality.main(["--ckpt", str(ckpt), "--peer", f"noise={peer}", "--amp", "bf16", *map(str, args)])
    assert [r["sampler"] for r in rows] == ["", "ddim (bf16)", ""] and float(rows[1]["fd"]) >= -1e-6
    assert [r["steps"] for r in rows] == ["", 3, ""]  # the real and peer rows were not drawn by our sampler
    time_to_quality.plot(csv_path, plot_path)  # the last row, a peer's, names no sampler for the title
    # A peer with fewer images than --num_samples would be scored at another count, where FD is larger.
    np.savez(root / "few.npz", x=np.zeros((5, 16, 16, 3), dtype=np.uint8), train_s=1.0)
    result = run_script("tools/time_to_quality.py", "--peer", f"few={root / 'few.npz'}", *args, cwd=root, check=False)
    assert_one_line_error(result, "5 images, fewer than --num_samples 8")
    result = run_script("tools/time_to_quality.py", "--peer", "noise", *args, cwd=root, check=False)
    assert_one_line_error(result, "--peer noise: expected NAME=PATH")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state["train_seconds"]
    torch.save(state, root / "old_ema.pt")
    result = run_script("tools/time_to_quality.py", "--ckpt", root / "old_ema.pt", *args, cwd=root, check=False)
    assert_one_line_error(result, "does not record its training time")


def test_nll_tool_reports_bits_per_dim(trained):
    root, folder = trained
    result = run_script("tools/nll.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--dataset_path", folder,
                        "--num_images", "3", "--batch_size", "2", "--device", "cpu", cwd=root)
    line = next(line for line in result.stdout.splitlines() if line.startswith("NLL bound:"))
    bits = float(line.split()[2])
    assert 0 < bits < 20 and "over 3 images" in line
    assert "t=0: " in result.stdout and "prior L_T" in result.stdout
    result = run_script("tools/nll.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--dataset_path",
                        root / "checkpoints", cwd=root, check=False)
    assert_one_line_error(result, "--dataset_path", "no image files found")


def test_nll_scores_the_same_images_whatever_the_network(trained, tmp_path, monkeypatch):
    """Two models of different sizes, the same --seed: the same images (their comparison is paired)."""
    import utils
    root, folder = trained
    flags = [*TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0", "--run_name", "wider"]
    flags[flags.index("--base_channels") + 1] = "32"
    run_script("train.py", "--dataset_path", folder, *flags, cwd=tmp_path)
    seen, real_getitem = [], utils.ImageFolderDataset.__getitem__
    monkeypatch.setattr(utils.ImageFolderDataset, "__getitem__", lambda self, i: seen.append(i) or real_getitem(self, i))
    noise = record_step_noise(monkeypatch)  # the x_t noise of every term
    for ckpt in (root / "checkpoints" / "pets_ema.pt", tmp_path / "checkpoints" / "wider_ema.pt"):
        run_script("tools/nll.py", "--ckpt", ckpt, "--dataset_path", folder, "--num_images", "4", "--batch_size", "4",
                   "--device", "cpu", cwd=tmp_path)
    assert len(seen) == 8 and seen[:4] == seen[4:]
    half = len(noise) // 2
    assert half > 0 and all(torch.equal(a, b) for a, b in zip(noise[:half], noise[half:]))  # the same noise too


def test_memory_benchmark_reports_peak_memory_and_speed_per_setting(tmp_path):
    result = run_script("tools/memory_benchmark.py", "--image_size", "16", "--base_channels", "8", "--channel_mults",
                        "1", "2", "--num_res_blocks", "1", "--batch_size", "4", "--steps", "2", "--device", "cpu",
                        "--settings", "baseline", "grad_checkpointing", "--csv", tmp_path / "memory.csv", cwd=tmp_path,
                        in_process=True)
    with open(tmp_path / "memory.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == ["baseline", "grad_checkpointing"]
    assert all(float(r["peak_memory_mb"]) > 0 and float(r["images_per_s"]) > 0 and r["device"] == "cpu" for r in rows)
    assert "grad_checkpointing" in result.stdout


def test_benchmark_counts_flops_and_writes_its_json(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import count_flops
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    # a 3x3 convolution: 2 FLOPs per multiply-add, Cin x k x k multiply-adds per output value
    assert count_flops(lambda: conv(torch.zeros(1, 3, 16, 16))) == 2 * 3 * 9 * 8 * 16 * 16
    result = run_script("tools/benchmark.py", "--image_size", "8", "--base_channels", "8", "--channel_mults", "1",
                        "2", "--num_res_blocks", "1", "--batch_size", "2", "--train_steps", "1", "--steps", "2",
                        "--timesteps", "20", "--device", "cpu", "--json", tmp_path / "bench.json", "--profile",
                        cwd=tmp_path, in_process=True)
    assert "Self CPU" in result.stdout and "convolution" in result.stdout  # --profile's table, by operator
    import json
    with open(tmp_path / "bench.json") as f:
        result = json.load(f)
    assert result["train_gflops_per_image"] > 2 * result["forward_gflops_per_image"] > 0  # backward ~ 2x forward
    assert result["train_images_per_s"] > 0 and result["achieved_train_gflop_per_s"] > 0
    assert [(r["sampler"], r["steps"]) for r in result["sampling"]] == [("ddpm", 2), ("ddim", 2)]
    assert result["amp"] == "off" and result["channels_last"] is True  # fp32 on a CPU: train.py's default layout


def test_benchmark_vs_lucidrains_runs_each_network_in_each_setting_and_names_a_missing_peer(tmp_path):
    """--vs-lucidrains (the GPU side by side) runs anywhere: each network and setting in its own process,
    bf16 with autocast in training and sampling; lucidrains' rows need its package, and say so without it."""
    result = run_script("tools/benchmark.py", "--vs-lucidrains", "--image_size", "8", "--base_channels", "8",
                        "--channel_mults", "1", "2", "--num_res_blocks", "1", "--lucid_dim", "8", "--lucid_mults", "1",
                        "2", "--batch_size", "2", "--train_steps", "1", "--samplers", "ddim", "--steps", "2",
                        "--timesteps", "20", "--device", "cpu", "--settings", "bf16", "--json", tmp_path / "vs.json",
                        cwd=tmp_path, in_process=True)
    import importlib.util
    import json
    with open(tmp_path / "vs.json") as f:
        rows = {(r["network"], r["setting"]): r for r in json.load(f)["rows"]}
    ours = rows[("ours", "bf16")]
    assert ours["amp"] == "bf16" and ours["sample_amp"] and not ours["compile"] and not ours["cudnn_benchmark"]
    assert ours["model_config"]["base_channels"] == 8 and [r["steps"] for r in ours["sampling"]] == [2]
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        assert ("lucidrains", "bf16") not in rows and "pip install denoising-diffusion-pytorch" in result.stdout
    else:
        assert rows[("lucidrains", "bf16")]["model_config"] == dict(
            network="lucidrains", dim=8, dim_mults=[1, 2], image_size=8, in_channels=3, num_classes=0)
    bad = run_script("tools/benchmark.py", "--vs-lucidrains", "--settings", "fp16", cwd=tmp_path, check=False,
                     in_process=True)
    assert bad.returncode != 0 and "'fp16': use fp32 or bf16" in bad.stderr
    assert_one_line_error(run_script("tools/benchmark.py", "--network", "lucidrains", "--num_classes", "10",
                                     cwd=tmp_path, check=False, in_process=True), "--network lucidrains")
    assert_one_line_error(run_script("tools/benchmark.py", "--vs-lucidrains", "--num_classes", "10",
                                     cwd=tmp_path, check=False, in_process=True), "--vs-lucidrains", "--num_classes")


FAKE_PEERS_PY = """
import json, re, sys
args = sys.argv[1:]
only = re.compile(args[args.index("--only") + 1])
contenders = [args[i + 1].rsplit("=", 1)[1] for i, a in enumerate(args) if a == "--contender"]
print(json.dumps(dict(kind="meta", cpu="test CPU", versions=dict(torch="x"), alloc="default", batch=64, res=32)))
print(json.dumps(dict(kind="machine_peak", peak_gflops=100.0)))
speeds = {"lucid-d32-122": 10.0, "diffusers-32-64-64": 20.0, "lucid-d64-122": 5.0, "diffusers-64-128-128": 4.0}
for name in [n for n in speeds if only.match(n)] + contenders:
    speed = speeds.get(name, 50.0 if "medium" not in name else 15.0)
    print(json.dumps(dict(kind="peer", name=name, params=10**6, train_img_s=speed, train_gflops_3x=2 * speed,
                          sample_evals_s=speed / 10, peak_rss_train_mb=1024.0)))
"""


def test_benchmark_vs_peers_passes_our_contenders_and_compares_each_with_the_fastest_peer(tmp_path):
    """--vs-peers against a stand-in for the peers' bench script (written here, in tmp_path) that prints
    rows in peers.py's format: which contenders are asked for (bf16 only where the CPU has bf16
    hardware, unless named), and the table's ratios to the fastest peer of the same size."""
    import json
    from utils import cpu_has_fast_bf16
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "peers.py").write_text(FAKE_PEERS_PY)
    common = ["--vs-peers", "--bench_dir", bench, "--bench_python", sys.executable]
    result = run_script("tools/benchmark.py", *common, "--json", tmp_path / "auto.json", cwd=tmp_path)
    with open(tmp_path / "auto.json") as f:
        auto = json.load(f)
    expected = ["ours-fp32", "ours-bf16", "ours-medium-fp32", "ours-medium-bf16"]
    if not cpu_has_fast_bf16():
        expected = [name for name in expected if not name.endswith("bf16")]
        assert "timing fp32 only" in result.stdout
    assert [m["name"] for m in auto["models"] if m["name"].startswith("ours")] == expected
    assert set(auto["peaks"]) == ({"fp32", "bf16"} if cpu_has_fast_bf16() else {"fp32"})  # peaks of the rows shown
    run_script("tools/benchmark.py", *common, "--sizes", "small", "--precisions", "fp32", "--json",
               tmp_path / "vs.json", cwd=tmp_path)
    with open(tmp_path / "vs.json") as f:
        vs = {m["name"]: m for m in json.load(f)["models"]}
    assert set(vs) == {"lucid-d32-122", "diffusers-32-64-64", "ours-fp32"}
    assert vs["ours-fp32"]["train_vs_best_peer"] == pytest.approx(50 / 20)  # against diffusers, the faster
    assert vs["lucid-d32-122"]["train_vs_best_peer"] == pytest.approx(10 / 20)
    assert vs["ours-fp32"]["sample_vs_best_peer"] == pytest.approx(5 / 2)
    assert vs["ours-fp32"]["precision"] == "fp32" and vs["ours-fp32"]["fraction_of_peak"] > 0
    (bench / "peers.py").write_text("import sys; sys.exit(3)")
    assert_one_line_error(run_script("tools/benchmark.py", *common, cwd=tmp_path, check=False),
                          "peers.py failed (exit code 3)")


# Three runs of a machine whose speed drifts (every model x machine[run]) while our model's own speed
# changes too: ratios to the fastest peer are 3.0, 1.5 and 2.5 within the runs, median 2.5; the ratio of
# the medians (ours 60 img/s, diffusers 20) would say 3.0. The second run also loses a model to an error.
FAKE_DRIFTING_PEERS_PY = """
import json, os, sys
args = sys.argv[1:]
run = len(os.listdir("runs")) if os.path.isdir("runs") else 0
os.makedirs(f"runs/{run}")
machine, ours = [1.0, 4.0, 0.5][run], [60.0, 30.0, 50.0][run]
print(json.dumps(dict(kind="meta", cpu="test CPU", versions=dict(torch="x"), alloc="default", batch=64, res=32)))
speeds = {"ours-fp32": ours, "lucid-d32-122": 10.0, "diffusers-32-64-64": 20.0}  # the tables put peers first
for name, speed in speeds.items():
    print(json.dumps(dict(kind="peer", name=name, params=10**6, train_img_s=speed * machine,
                          train_gflops_3x=speed, sample_evals_s=speed * machine / 10, peak_rss_train_mb=1024.0 * (run + 1))))
if run == 1:
    print(json.dumps(dict(kind="error", name="ours-medium-fp32", error="Traceback ...\\nTimeoutExpired: 600 s")))
"""


def test_benchmark_vs_peers_repeats_reports_the_median_of_ratios_taken_within_each_run(tmp_path):
    """--vs-peers --repeats n: n bench runs, each with its own table; then each model's median over the runs,
    where a ratio to the fastest peer is taken within its run first (the machine drifts between runs) and
    an even count averages the middle two. A model that failed in a run is named, not a traceback."""
    import json
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import median_over_runs
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "peers.py").write_text(FAKE_DRIFTING_PEERS_PY)
    common = ["--vs-peers", "--bench_dir", bench, "--bench_python", sys.executable, "--sizes", "small",
              "--precisions", "fp32"]
    result = run_script("tools/benchmark.py", *common, "--repeats", "3", "--json", tmp_path / "vs.json", cwd=tmp_path)
    assert [line for line in result.stdout.splitlines() if line.startswith("run ")] == [
        "run 1 of 3", "run 2 of 3", "run 3 of 3"]
    assert "ours-medium-fp32: failed in peers.py, left out of the table: TimeoutExpired: 600 s" in result.stdout
    with open(tmp_path / "vs.json") as f:
        saved = json.load(f)
    assert saved["repeats"] == 3 and len(saved["runs"]) == 3
    assert [r["name"] for r in saved["runs"][1]["failed"]] == ["ours-medium-fp32"]
    assert [r["name"] for r in saved["median"]] == ["lucid-d32-122", "diffusers-32-64-64", "ours-fp32"]
    median = {r["name"]: r for r in saved["median"]}
    ours = median["ours-fp32"]
    assert ours["runs"] == 3 and ours["train_img_s"] == pytest.approx(60.0)  # of 60, 120 and 25
    assert ours["train_vs_best_peer"] == pytest.approx(2.5)  # of 3.0, 1.5, 2.5: not 60 / 20
    assert ours["train_vs_best_peer_range"] == pytest.approx([1.5, 3.0])
    assert ours["sample_vs_best_peer"] == pytest.approx(2.5) and ours["peak_rss_train_mb"] == pytest.approx(2048.0)
    assert "| ours-fp32 | small | fp32 | 1.00 M | 60.0 | 2.50x (1.50-3.00) |" in result.stdout
    even = median_over_runs(saved["runs"][:2])  # ratios 3.0 and 1.5
    assert next(r for r in even if r["name"] == "ours-fp32")["train_vs_best_peer"] == pytest.approx(2.25)
    # A run in which a peer failed has no ratios (its "fastest peer" would be the slower one): they are left
    # out of the ratios' medians, and the table says from how many runs they come.
    saved["runs"][1]["models"] = [dict(r, train_vs_best_peer=float("nan"), sample_vs_best_peer=float("nan"))
                                  for r in saved["runs"][1]["models"]]
    ours = next(r for r in median_over_runs(saved["runs"]) if r["name"] == "ours-fp32")
    assert ours["train_vs_best_peer"] == pytest.approx(2.75) and ours["ratio_runs"] == 2 and ours["runs"] == 3
    assert ours["train_img_s"] == pytest.approx(60.0)  # the speeds themselves still count
    assert_one_line_error(run_script("tools/benchmark.py", *common, "--repeats", "0", cwd=tmp_path, check=False),
                          "--repeats 0")


def test_peer_contenders_are_the_networks_train_py_runs_in_the_layout_it_picks():
    """tools/peer_contender.py: fp32 builders lay the default network out in channels_last (train.py's
    choice for fp32 on a CPU) and take the bench's NCHW images; bf16 builders keep NCHW under autocast."""
    sys.path.insert(0, str(ROOT / "tools"))
    import peer_contender
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    fp32, bf16 = peer_contender.build(3, 16), peer_contender.build_bf16(3, 16)
    assert fp32.model.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not bf16.model.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fp32(x, t).shape == bf16(x, t).shape == (2, 3, 16, 16) and bf16(x, t).dtype == torch.float32


def test_training_sweep_configurations_one_at_a_time_and_in_full_leave_out_what_train_py_refuses(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    from training_sweep import configurations, parse_args, run_name
    argv = ["--dataset_path", "d", "--classifier", "c", "--reference_path", "r", "--losses", "l2", "vlb_l2",
            "--predictions", "eps", "v", "--min_snr_gammas", "0", "5"]
    names = [run_name(*config) for config in configurations(parse_args(argv))]
    # The baseline, then each other value alone; earlier sweeps' names stay as they were.
    assert names == ["T1000_linear_l2", "T1000_linear_vlb_l2", "T1000_linear_l2_v", "T1000_linear_l2_minsnr5"]
    names = [run_name(*config) for config in configurations(parse_args(argv + ["--grid", "full"]))]
    # 2 x 2 x 2 combinations; vlb_l2 (a weighting of a predicted eps) goes with eps and no Min-SNR only.
    assert names == ["T1000_linear_l2", "T1000_linear_l2_minsnr5", "T1000_linear_l2_v", "T1000_linear_l2_v_minsnr5",
                     "T1000_linear_vlb_l2"]
    assert capsys.readouterr().out.count("left out") == 3


def test_training_sweep_trains_each_configuration_scores_it_and_picks_up_where_it_stopped(trained, tmp_path):
    """tools/training_sweep.py: one choice at a time from the baseline (the first values), each run a real
    train.py whose checkpoint describes the configuration; a second call trains nothing and scores the
    same (the same noise, the same weights); a larger budget resumes each run; bad input is one line."""
    root, folder = trained
    train_flags = [f for f in TINY_TRAIN_FLAGS]
    for flag in ("--timesteps", "--device"):  # the sweep sets these itself
        i = train_flags.index(flag)
        del train_flags[i:i + 2]
    out = tmp_path / "sweep"
    args = ["--dataset_path", folder, "--classifier", root / "classifier.pt", "--reference_path", folder,
            "--timesteps", "20", "--losses", "l2", "vlb_l2", "--schedules", "linear", "cosine", "--predictions", "eps",
            "v", "--max_steps", "2",
            "--num_samples", "4", "--sample_steps", "2", "--batch_size", "4", "--out_dir", out, "--device", "cpu"]
    first = run_script("tools/training_sweep.py", *args, "--", *train_flags, "--sample_every", "0", cwd=tmp_path)
    assert "4 runs of 2 steps: T20_linear_l2, T20_cosine_l2, T20_linear_vlb_l2, T20_linear_l2_v" in first.stdout
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["real", "T20_linear_l2", "T20_cosine_l2", "T20_linear_vlb_l2",
                                        "T20_linear_l2_v"]
    assert [(r["schedule"], r["loss"], r["prediction"]) for r in rows[1:]] == [
        ("linear", "l2", "eps"), ("cosine", "l2", "eps"), ("linear", "vlb_l2", "eps"), ("linear", "l2", "v")]
    for r in rows[1:]:
        state = torch.load(out / "checkpoints" / f"{r['run']}.pt", map_location="cpu", weights_only=True)
        assert state["step"] == 2 and state["diffusion_config"]["timesteps"] == 20
        config = state["diffusion_config"]
        assert (config["schedule"], config["loss"], config["prediction"]) == (r["schedule"], r["loss"], r["prediction"])
        assert config["min_snr_gamma"] == 0 and r["min_snr_gamma"] == "0"
        assert float(r["fd"]) >= -1e-6 and r["num_samples"] == "4" and float(r["train_seconds"]) >= 0
        # train time is train.py's clock of training steps, not the process's (start-up, grids, saving)
        assert float(r["train_seconds"]) == pytest.approx(state["train_seconds"], abs=0.05)
    assert (out / "results.png").is_file() and "| T20_linear_vlb_l2 | 20 | linear | vlb_l2 |" in first.stdout

    again = run_script("tools/training_sweep.py", *args, "--", *train_flags, "--sample_every", "0", cwd=tmp_path)
    assert again.stdout.count("already trained (2 steps)") == 4 and "training for" not in again.stdout
    with open(out / "results.csv") as f:
        assert [r["fd"] for r in csv.DictReader(f)] == [r["fd"] for r in rows]  # same weights, same noise

    longer = [a if a != "2" or args[i - 1] != "--max_steps" else "3" for i, a in enumerate(args)]
    # One configuration only (the last --losses / --schedules / --predictions given wins): each run is a
    # train.py process of its own, several seconds of starting Python and importing torch here.
    more = run_script("tools/training_sweep.py", *longer, "--losses", "l2", "--schedules", "linear",
                      "--predictions", "eps", "--", *train_flags, "--sample_every", "0", cwd=tmp_path)
    assert "1 run of 3 steps: T20_linear_l2\n" in more.stdout
    assert "T20_linear_l2: training for 3 steps (resuming at step 2)" in more.stdout
    assert torch.load(out / "checkpoints" / "T20_linear_l2.pt", weights_only=True)["step"] == 3

    clash = run_script("tools/training_sweep.py", *args, "--", "--loss", "l1", cwd=tmp_path, check=False)
    assert_one_line_error(clash, "--loss", "set by the sweep itself")
    broken = run_script("tools/training_sweep.py", *args, "--out_dir", tmp_path / "broken", "--",
                        *train_flags, "--base_channels", "0", cwd=tmp_path, check=False)
    assert_one_line_error(broken, "run T20_linear_l2: train.py stopped", "--base_channels",
                          str(tmp_path / "broken" / "logs" / "T20_linear_l2.log"))


def test_training_sweep_stops_its_train_py_when_something_else_stops_the_sweep(tmp_path, monkeypatch):
    """A run's train.py is a process of its own. Ctrl-C reaches both (train.py saves; the sweep waits
    for it); anything else that stops the sweep while it waits, a time limit's signal or a SIGTERM to
    the sweep alone, must stop train.py too: SIGTERM, which train.py takes as Ctrl-C (save, then exit), and SIGKILL only for a
    process that has not stopped after the grace period. A stand-in sleeps in train.py's place."""
    import argparse
    import os
    import signal
    import subprocess
    import threading
    from conftest import ScriptTimeout, time_limit
    sys.path.insert(0, str(ROOT / "tools"))
    import training_sweep
    started, real_popen = [], subprocess.Popen

    def sleeper(command, **kwargs):  # what train() runs instead of train.py
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return started[-1]

    monkeypatch.setattr(training_sweep.subprocess, "Popen", sleeper)
    args = argparse.Namespace(out_dir=str(tmp_path), dataset_path="d", max_steps=2, seed=0, device="cpu",
                              train_args=[])
    with pytest.raises(ScriptTimeout), time_limit(1.0):
        training_sweep.train(args, "run", 20, "linear", "l2", "eps", 0.0)
    assert started[0].returncode == -signal.SIGTERM  # stopped, and waited for: no orphan left training
    assert (tmp_path / "logs" / "run.json").is_file()  # its time so far is kept for the table

    # SIGTERM to the sweep alone (`kill`, `timeout`): the same, through the sweep's handler while it waits.
    def not_handled(signum, frame):  # stands in for the default (death of the test process) if it did not
        raise AssertionError("SIGTERM reached the test's handler, not the sweep's")

    outer = signal.signal(signal.SIGTERM, not_handled)
    try:
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        with pytest.raises(SystemExit, match="terminated: run the same command again"):
            training_sweep.train(args, "run", 20, "linear", "l2", "eps", 0.0)
        timer.join()
        assert started[1].returncode == -signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is not_handled  # the handler is the sweep's only while it waits
    finally:
        signal.signal(signal.SIGTERM, outer)

    deaf = real_popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                       "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert deaf.stdout.readline() == "ready\n"  # SIGTERM is ignored from here on
    assert training_sweep.stop_and_wait(deaf, seconds=0.5) == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------
# Bad input is refused before the long work (sampling, training, measuring), not after it.
# ---------------------------------------------------------------------------------------------

def expert_copy(ckpt, path):
    """The checkpoint as train.py --t_min 0 --t_max 9 would have saved it: an expert denoiser (experts.py)
    for half of the tiny model's T = 20, which a tool would run alone at every t."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    torch.save(dict(state, t_range=[0, 9]), path)
    return path


def test_sampler_sweep_refuses_outputs_ignored_flags_and_experts_before_sampling(trained, tmp_path):
    """A --grids, --plot or --save_samples that cannot be written, --eta/--spacing without DDIM rows (which
    would be ignored) and an expert denoiser alone: one line each, before anything is sampled or scored."""
    root, folder = trained
    (tmp_path / "a_file").write_text("")
    (tmp_path / "plot.png").mkdir()
    common = ["--classifier", root / "classifier.pt", "--reference_path", folder, "--steps", "2", "--num_samples",
              "4", "--samplers", "ddim", "--csv", tmp_path / "s.csv", "--device", "cpu"]
    ckpt = ["--ckpt", root / "checkpoints" / "pets_ema.pt"]
    expert = expert_copy(root / "checkpoints" / "pets_ema.pt", tmp_path / "expert_ema.pt")
    for flags, fragments in ((["--grids", tmp_path / "a_file"], ["--grids", "is a file"]),
                             (["--plot", tmp_path / "plot.png"], ["--plot", "a folder of that name"]),
                             (["--plot", tmp_path / "plot"], ["--plot", "name a .png"]),
                             (["--save_samples", tmp_path / "a_file"], ["--save_samples", "is a file"]),
                             (["--samplers", "ddpm", "--eta", "0.5"], ["--eta and --spacing", "no ddim"]),
                             (["--samplers", "ddpm", "--spacing", "quadratic"], ["--eta and --spacing"])):
        refused = run_script("tools/sampler_sweep.py", *ckpt, *common, *flags, cwd=tmp_path, check=False)
        assert_one_line_error(refused, *fragments)
        assert "FD" not in refused.stdout and not (tmp_path / "s.csv").exists()
    refused = run_script("tools/sampler_sweep.py", "--ckpt", expert, *common, cwd=tmp_path, check=False)
    assert_one_line_error(refused, "expert_ema.pt: an expert denoiser for t = 0..9 only")
    assert "FD" not in refused.stdout


def test_sampler_sweep_save_samples_folder_holds_exactly_one_draw(trained, tmp_path):
    """A second --save_samples run of fewer samples into the same folder replaces the first draw rather than
    leaving its extra files (00004.png, 00005.png) among the new ones; a file this tool did not write there
    is refused before the sampling."""
    root, folder = trained
    common = ["--ckpt", root / "checkpoints" / "pets_ema.pt", "--classifier", root / "classifier.pt",
              "--reference_path", folder, "--steps", "2", "--samplers", "ddim", "--csv", tmp_path / "s.csv",
              "--save_samples", tmp_path / "saved", "--device", "cpu"]
    run_script("tools/sampler_sweep.py", *common, "--num_samples", "6", cwd=tmp_path)
    setting = tmp_path / "saved" / "pets_ema_ddim_2"
    assert len(list(setting.glob("*/*.png"))) == 6
    run_script("tools/sampler_sweep.py", *common, "--num_samples", "4", cwd=tmp_path)
    for name in ("pets_ema_ddim_2", "pets_ema_real"):
        files = sorted(p.relative_to(tmp_path / "saved" / name).as_posix() for p in (tmp_path / "saved" / name).rglob("*.png"))
        assert sorted(f.split("/")[1] for f in files) == ["00000.png", "00001.png", "00002.png", "00003.png"], files
    (setting / "notes.txt").write_text("mine")
    refused = run_script("tools/sampler_sweep.py", *common, "--num_samples", "4", cwd=tmp_path, check=False)
    assert_one_line_error(refused, "--save_samples", "notes.txt was not written by this tool")
    assert "FD" not in refused.stdout and (setting / "notes.txt").is_file()


@pytest.mark.filterwarnings("ignore:Frechet distance from", "ignore:.*near chance")
def test_time_to_quality_checks_every_checkpoint_peer_and_output_before_scoring(trained, tmp_path):
    """--ckpt good.pt bad.pt refuses bad.pt before good.pt is scored; a truncated or 5-D peer, a --grids
    that is a file and a --plot that is a folder are one line each, before the first score."""
    root, folder = trained
    good = root / "checkpoints" / "pets_ema.pt"
    state = torch.load(good, map_location="cpu", weights_only=True)
    del state["train_seconds"]
    torch.save(state, tmp_path / "old_ema.pt")
    expert = expert_copy(good, tmp_path / "expert_ema.pt")
    peer = tmp_path / "peer.npz"
    np.savez(peer, x=np.zeros((8, 16, 16, 3), dtype=np.uint8), train_s=1.0)
    (tmp_path / "cut.npz").write_bytes(peer.read_bytes()[:200])
    np.savez(tmp_path / "five_d.npz", x=np.zeros((8, 1, 16, 16, 3), dtype=np.uint8), train_s=1.0)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "plot.png").mkdir()
    common = ["--classifier", root / "classifier.pt", "--reference_path", folder, "--num_samples", "4",
              "--steps", "2", "--csv", tmp_path / "t.csv", "--device", "cpu"]
    for flags, fragments in ((["--ckpt", good, tmp_path / "old_ema.pt"], ["old_ema.pt", "train_seconds"]),
                             (["--ckpt", good, expert], ["expert_ema.pt", "an expert denoiser for t = 0..9"]),
                             (["--peer", f"cut={tmp_path / 'cut.npz'}"], ["--peer cut=", "cannot read", "BadZipFile"]),
                             (["--peer", f"p={tmp_path / 'five_d.npz'}"], ["--peer p=", "shape (8, 1, 16, 16, 3)"]),
                             (["--peer", f"p={peer}", "--grids", tmp_path / "a_file"], ["--grids", "is a file"]),
                             (["--peer", f"p={peer}", "--plot", tmp_path / "plot.png"], ["--plot", "a folder"])):
        refused = run_script("tools/time_to_quality.py", *common, *flags, cwd=tmp_path, check=False)
        assert_one_line_error(refused, *fragments)
        assert " min (step " not in refused.stdout and not (tmp_path / "t.csv").exists()  # nothing scored


def test_guidance_sweep_refuses_scales_and_flags_it_would_ignore_or_misread(trained, tmp_path):
    """NaN or negative scales (NaN drew unguided columns under a guided label), --classifier_ckpt with
    --mode cfg, --csv without --eval_classifier (nothing written), an --out that is no image name or is a
    folder, and an expert alone: one line each, before the sampling."""
    root, _ = trained
    ckpt = root / "checkpoints" / "pets_ema.pt"
    (tmp_path / "g.png").mkdir()
    common = ["--steps", "2", "--device", "cpu"]
    expert = expert_copy(ckpt, tmp_path / "expert_ema.pt")
    for flags, fragments in (
            (["--mode", "classifier", "--classifier_ckpt", "x.pt", "--scales", "-1", "nan", "--out", "x.png"],
             ["--scales -1 nan", "finite and >= 0"]),
            (["--scales", "inf", "--out", "x.png"], ["--scales inf"]),
            (["--classifier_ckpt", "x.pt", "--out", "x.png"], ["--classifier_ckpt", "--mode cfg would ignore it"]),
            (["--csv", "g.csv", "--out", "x.png"], ["--csv", "--eval_classifier"]),
            (["--out", "grid"], ["--out grid", "name a .png"]),
            (["--out", tmp_path / "g.png"], ["--out", "a folder of that name"])):
        refused = run_script("tools/guidance_sweep.py", "--ckpt", ckpt, *common, *flags, cwd=tmp_path, check=False)
        assert_one_line_error(refused, *fragments)
        assert "samples in" not in refused.stdout
    refused = run_script("tools/guidance_sweep.py", "--ckpt", expert, *common, "--out", "x.png", cwd=tmp_path,
                         check=False)
    assert_one_line_error(refused, "an expert denoiser for t = 0..9 only")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "g.csv").exists()


def test_nll_refuses_an_expert_alone_and_says_plainly_it_reads_a_folder(trained, tmp_path):
    """The bound sums a term for every t; an expert denoiser knows only its interval. An .npz is not read
    (the error may not offer one, as train.py's does)."""
    root, folder = trained
    expert = expert_copy(root / "checkpoints" / "pets_ema.pt", tmp_path / "expert_ema.pt")
    refused = run_script("tools/nll.py", "--ckpt", expert, "--dataset_path", folder, "--num_images", "2",
                         "--device", "cpu", cwd=tmp_path, check=False)
    assert_one_line_error(refused, "--ckpt", "an expert denoiser for t = 0..9 only")
    assert "NLL bound" not in refused.stdout
    np.savez(tmp_path / "tiny.npz", x_test=np.zeros((4, 16, 16), dtype=np.uint8), y_test=np.zeros(4, dtype=np.int64))
    refused = run_script("tools/nll.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", "--dataset_path",
                         tmp_path / "tiny.npz", cwd=tmp_path, check=False)
    assert_one_line_error(refused, "--dataset_path", "folder")
    assert "or at an .npz file" not in refused.stderr


def test_memory_benchmark_refuses_a_wrong_csv_fp16_on_a_cpu_and_zero_steps_before_measuring(tmp_path):
    """Before the first setting runs train.py: a --csv of other columns, --fp16 without CUDA and --steps 0
    (named as its own flag, not train.py's --max_steps), each one line rather than a traceback at the end."""
    (tmp_path / "other.csv").write_text("run,minutes\n")
    common = ["--image_size", "16", "--base_channels", "8", "--channel_mults", "1", "2", "--num_res_blocks", "1",
              "--batch_size", "2", "--steps", "2", "--settings", "baseline"]
    cases = [(["--csv", tmp_path / "other.csv", "--device", "cpu"], ["--csv", "its columns are not"]),
             (["--steps", "0", "--device", "cpu"], ["--steps 0"])]
    if not torch.cuda.is_available():
        cases.append((["--fp16"], ["--fp16", "CUDA only"]))
    for flags, fragments in cases:
        refused = run_script("tools/memory_benchmark.py", *common, *flags, cwd=tmp_path, check=False, in_process=True)
        assert_one_line_error(refused, *fragments)
        assert "max_steps" not in refused.stderr and "baseline " not in refused.stdout  # no setting was measured


def test_benchmark_refuses_zero_counts_and_network_flags_a_checkpoint_would_ignore(trained, tmp_path):
    """--batch_size 0 printed a table of zeros, --train_steps 0 an UnboundLocalError, --channels 0 a GroupNorm
    error; with --ckpt the network flags were silently ignored."""
    root, _ = trained
    for flags, fragment in ((["--batch_size", "0"], "--batch_size 0"), (["--train_steps", "0"], "--train_steps 0"),
                            (["--train_steps", "-1"], "--train_steps -1"), (["--channels", "0"], "--channels 0")):
        refused = run_script("tools/benchmark.py", *flags, "--device", "cpu", cwd=tmp_path, check=False,
                             in_process=True)
        assert_one_line_error(refused, fragment, "at least 1")
    for flags in (["--image_size", "64"], ["--base_channels", "32"], ["--num_classes", "0"]):  # the defaults too
        refused = run_script("tools/benchmark.py", "--ckpt", root / "checkpoints" / "pets_ema.pt", *flags,
                             "--device", "cpu", cwd=tmp_path, check=False, in_process=True)
        assert_one_line_error(refused, flags[0], "come from --ckpt")


def test_training_sweep_checks_its_flags_and_folders_before_the_first_run(trained, tmp_path):
    """Abbreviated train.py flags after '--' (argparse takes --max_step for --max_steps) clash like whole ones;
    --t_min/--t_max would make experts scored alone; a missing --reference_path and an --out_dir that is a
    file are refused before any training, not after the first run."""
    root, folder = trained
    (tmp_path / "a_file").write_text("")
    common = ["--dataset_path", folder, "--classifier", root / "classifier.pt", "--reference_path", folder,
              "--timesteps", "20", "--max_steps", "1", "--num_samples", "4", "--sample_steps", "2", "--device", "cpu",
              "--out_dir", tmp_path / "sweep"]
    for flags, fragments in ((["--", "--max_step", "1"], ["--max_step", "set by the sweep itself"]),
                             (["--", "--see=7"], ["--see", "set by the sweep itself"]),
                             (["--", "--t_max", "9"], ["--t_max", "expert denoiser"]),
                             (["--", "--dataset", "mnist"], ["--dataset names a built-in", "export_dataset.py"]),
                             (["--reference_path", tmp_path / "nosuch"], ["--reference_path", "no such folder"]),
                             (["--out_dir", tmp_path / "a_file"], ["--out_dir", "is a file"])):
        refused = run_script("tools/training_sweep.py", *common, *flags, cwd=tmp_path, check=False)
        assert_one_line_error(refused, *fragments)
        assert "training for" not in refused.stdout


def test_training_sweep_picks_up_a_run_only_when_it_was_trained_with_these_settings(tmp_path, monkeypatch):
    """A run found in --out_dir is skipped (finished) or resumed only when its checkpoint was trained on the
    same data and seed, with the same flags after '--', for no more than --max_steps; otherwise one line
    naming a fresh --out_dir, and train.py is not started (its --resume would keep the old settings)."""
    import argparse
    sys.path.insert(0, str(ROOT / "tools"))
    import training_sweep
    from utils import UsageError
    started = []

    class Finished:  # stands in for train.py's process
        def wait(self):
            return 0

    monkeypatch.setattr(training_sweep.subprocess, "Popen", lambda command, **k: started.append(command) or Finished())
    (tmp_path / "data").mkdir()
    args = argparse.Namespace(out_dir=str(tmp_path / "sweep"), dataset_path=str(tmp_path / "data"), max_steps=2,
                              seed=0, device="cpu", train_args=["--base_channels", "16"])
    training_sweep.train(args, "run", 20, "linear", "l2", "eps", 0.0)  # no checkpoint yet: train.py runs
    assert len(started) == 1 and "--resume" not in started[0]
    # what train.py would have saved: the step and its config (the sweep passes the data's absolute path)
    (tmp_path / "sweep" / "checkpoints").mkdir()
    torch.save(dict(step=2, train_seconds=3.0, config=dict(dataset_path=str(tmp_path / "data"), seed=0)),
               tmp_path / "sweep" / "checkpoints" / "run.pt")
    assert training_sweep.train(args, "run", 20, "linear", "l2", "eps", 0.0) == 3.0 and len(started) == 1  # finished
    (tmp_path / "other").mkdir()
    for change, fragment in ((dict(dataset_path=str(tmp_path / "other")), "was trained on --dataset_path"),
                             (dict(max_steps=1), "was trained for 2 steps, more than --max_steps 1"),
                             (dict(seed=7), "was trained with --seed 0, not 7"),
                             (dict(train_args=["--base_channels", "32"]), "-- --base_channels 16"),
                             (dict(train_args=[]), "-- --base_channels 16"),
                             (dict(max_steps=3, seed=7), "--seed 0")):  # a resume is checked too
        with pytest.raises(UsageError, match=fragment) as refused:
            training_sweep.train(argparse.Namespace(**{**vars(args), **change}), "run", 20, "linear", "l2", "eps", 0.0)
        assert "fresh --out_dir" in str(refused.value) and len(started) == 1
    training_sweep.train(argparse.Namespace(**{**vars(args), "max_steps": 3}), "run", 20, "linear", "l2", "eps", 0.0)
    assert len(started) == 2 and "--resume" in started[1]  # a larger budget resumes the same run
