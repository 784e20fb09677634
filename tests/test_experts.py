"""experts.py (eDiff-I's ensemble of expert denoisers) and the t interval of train.py --t_min/--t_max:
each t is served by exactly the expert whose interval holds it; an ensemble of copies of one model is
that model; the intervals must tile 0..T-1; an expert trains only on its interval, without bias; and
the command line end to end."""
import pytest
import torch

from conftest import TINY_TRAIN_FLAGS, assert_one_line_error, run_script
from ddim import ddim_sample
from ddpm import GaussianDiffusion
from experts import ExpertEnsemble, check_coverage
from guidance import classifier_free_guidance
from improved_ddpm import TimestepSampler
from model import build_model
from utils import UsageError


class Constant(torch.nn.Module):
    """A stand-in expert whose output is its own number, so the output says who served each image; it
    also records the labels and conditioning it was handed."""

    def __init__(self, number):
        super().__init__()
        self.number, self.calls = number, []

    def forward(self, x, t, y=None, cond=None):
        self.calls.append((t.clone(), None if y is None else y.clone(), None if cond is None else cond.clone()))
        return torch.full_like(x, float(self.number))


def test_each_t_is_served_by_exactly_the_expert_whose_interval_holds_it():
    experts = [Constant(0), Constant(1), Constant(2)]
    ensemble = ExpertEnsemble(experts, [(0, 3), (4, 11), (12, 19)])
    t = torch.tensor([19, 0, 4, 3, 12, 11, 7, 0])
    y, cond = torch.arange(8) * 10, torch.arange(8).float().view(8, 1, 1, 1).expand(8, 1, 2, 2)
    out = ensemble(torch.zeros(8, 1, 2, 2), t, y, cond=cond)
    owner = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0])
    assert torch.equal(out[:, 0, 0, 0], owner.float())
    for number, expert in enumerate(experts):  # each got its own images' t, labels and conditioning, once
        (seen_t, seen_y, seen_cond), = expert.calls
        mine = owner == number
        assert torch.equal(seen_t, t[mine]) and torch.equal(seen_y, y[mine])
        assert torch.equal(seen_cond, cond[mine])
    # A sampler's batch (one t for all) goes whole to one expert, without copies.
    experts[1].calls.clear()
    same = ensemble(torch.zeros(5, 1, 2, 2), torch.full((5,), 9))
    assert (same == 1).all() and len(experts[1].calls) == 1 and len(experts[0].calls) == 1


def test_an_ensemble_of_copies_of_one_model_is_that_model():
    """The same network three times over three intervals: every output, DDIM's samples and classifier-free
    guidance (the doubled batch goes through the ensemble) are the plain model's."""
    torch.manual_seed(0)
    model = build_model(dict(image_size=8, in_channels=1, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                             attention_resolutions=[], dropout=0.0, num_classes=2)).eval()
    for p in model.parameters():  # the zero-initialised output layer would make every model agree
        p.data.add_(0.05 * torch.randn_like(p))
    ensemble = ExpertEnsemble([model, model, model], [(0, 4), (5, 5), (6, 19)]).eval()
    x, t, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 5, 19, 4, 6, 12]), torch.tensor([0, 1, 2, 1, 0, 2])
    with torch.no_grad():
        assert torch.allclose(ensemble(x, t, y), model(x, t, y), atol=1e-6)
        guided, plain = classifier_free_guidance(ensemble, 3.0, 2), classifier_free_guidance(model, 3.0, 2)
        assert torch.allclose(guided(x, t, y), plain(x, t, y), atol=1e-6)
    diffusion = GaussianDiffusion(timesteps=20)
    noise, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    a = ddim_sample(diffusion, model, noise.shape, 10, 0.0, "uniform", labels, noise, progress=False)
    b = ddim_sample(diffusion, ensemble, noise.shape, 10, 0.0, "uniform", labels, noise, progress=False)
    assert torch.equal(a, b)


def test_intervals_must_cover_every_t_exactly_once():
    check_coverage([(10, 19), (0, 9)], 20, ["b", "a"])  # any order
    check_coverage([(0, 19)], 20, ["all"])
    with pytest.raises(UsageError, match="no expert covers t = 10..11.*--t_min 10 --t_max 11"):
        check_coverage([(0, 9), (12, 19)], 20, ["a", "b"])
    with pytest.raises(UsageError, match="b .t = 8..19. overlaps"):
        check_coverage([(0, 9), (8, 19)], 20, ["a", "b"])
    with pytest.raises(UsageError, match="no expert covers t = 15..19"):
        check_coverage([(0, 14)], 20, ["a"])
    with pytest.raises(UsageError, match="no expert covers t = 0..4"):
        check_coverage([(5, 19)], 20, ["a"])


@pytest.mark.parametrize("kind", ["uniform", "loss-aware"])
def test_an_expert_draws_t_only_from_its_interval_and_its_loss_stays_unbiased(kind):
    sampler = TimestepSampler(20, kind, t_range=(5, 9))
    g = torch.Generator().manual_seed(0)
    t, weights = sampler.sample(5000, "cpu", g)
    assert t.min() == 5 and t.max() == 9
    counts = torch.bincount(t, minlength=20)[5:10].float()
    assert (counts - 1000).abs().max() < 120 and torch.allclose(weights, torch.ones_like(weights))
    if kind == "loss-aware":  # with a full history the draw follows the losses, and the weights undo it
        losses = torch.arange(20, dtype=torch.float64) + 1
        for _ in range(10):
            sampler.update(torch.arange(5, 10), losses[5:10])
        p = sampler.probabilities()
        assert p[:5].sum() == 0 and p[10:].sum() == 0 and p[9] > p[5]
        # The sampler's own draws and weights: E_{t ~ p}[w_t L_t] = the plain mean of L over the interval
        # (weights 1 / (5 p_t): the interval's 5 steps, not all 20, count).
        t, weights = sampler.sample(200_000, "cpu", g)
        assert t.min() == 5 and t.max() == 9
        assert float((weights.double() * losses[t]).mean()) == pytest.approx(float(losses[5:10].mean()), rel=0.02)
    with pytest.raises(UsageError, match="--t_min 9 --t_max 5"):
        TimestepSampler(20, kind, t_range=(9, 5))


def test_train_two_experts_and_sample_with_both(tmp_path, image_folder):
    common = [*TINY_TRAIN_FLAGS, "--max_steps", "2", "--sample_every", "0"]
    run_script("train.py", "--dataset_path", image_folder, *common, "--run_name", "base", cwd=tmp_path)
    # A base model with unmistakable weights (every weight + 1), to see that --init_from starts from them.
    base = torch.load(tmp_path / "checkpoints" / "base_ema.pt", weights_only=True)
    base["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in base["ema"].items()}
    torch.save(base, tmp_path / "checkpoints" / "shifted_ema.pt")
    low = run_script("train.py", "--dataset_path", image_folder, *common, "--run_name", "low", "--t_min", "0",
                     "--t_max", "7", "--init_from", "checkpoints/shifted_ema.pt", cwd=tmp_path)
    assert "expert denoiser (eDiff-I, experts.py): trains on t = 0..7 of 0..19" in low.stdout
    assert "starting from checkpoints/shifted_ema.pt" in low.stdout
    run_script("train.py", "--dataset_path", image_folder, *common, "--run_name", "high", "--t_min", "8",
               cwd=tmp_path)
    low_state = torch.load(tmp_path / "checkpoints" / "low.pt", weights_only=True)
    high_state = torch.load(tmp_path / "checkpoints" / "high_ema.pt", weights_only=True)
    assert (base["t_range"], low_state["t_range"], high_state["t_range"]) == ([0, 19], [0, 7], [8, 19])
    # Fine-tuned: two small steps away from the shifted weights (model and EMA); a fresh start is ~1 away.
    for weights in (low_state["model"], low_state["ema"]):
        assert (weights["input_conv.weight"] - base["ema"]["input_conv.weight"]).abs().max() < 0.01
    assert (high_state["ema"]["input_conv.weight"] - base["ema"]["input_conv.weight"]).abs().min() > 0.9

    result = run_script("sample.py", "--ckpt", "checkpoints/low_ema.pt", "--ckpt", "checkpoints/high_ema.pt",
                        "--num_samples", "2", "--sampler", "ddim", "--steps", "5", cwd=tmp_path)
    assert "expert checkpoints/low_ema.pt: t = 0..7" in result.stdout
    assert (tmp_path / "samples" / "low_ema_experts.png").is_file()
    alone = run_script("sample.py", "--ckpt", "checkpoints/high_ema.pt", "--num_samples", "1", "--steps", "2",
                       cwd=tmp_path)
    assert "is an expert for t = 8..19 only" in alone.stdout

    def fails(*args, script="sample.py"):
        return run_script(script, *args, cwd=tmp_path, check=False)
    assert_one_line_error(fails("--ckpt", "checkpoints/low_ema.pt", "--ckpt", "checkpoints/base_ema.pt"), "overlaps")
    assert_one_line_error(fails("--ckpt", "checkpoints/low_ema.pt", "--ckpt", "checkpoints/low.pt"), "overlaps")
    assert_one_line_error(fails("--dataset_path", image_folder, *common, "--run_name", "x", "--init_from",
                                "checkpoints/base_ema.pt", "--base_channels", "8", script="train.py"),
                          "--init_from checkpoints/base_ema.pt", "base_channels")
    noisy = torch.load(tmp_path / "checkpoints" / "base_ema.pt", weights_only=True)
    noisy["task"] = "classifier"  # as a noisy classifier's checkpoint says of itself
    torch.save(noisy, tmp_path / "checkpoints" / "noisy_ema.pt")
    assert_one_line_error(fails("--dataset_path", image_folder, *common, "--run_name", "y", "--init_from",
                                "checkpoints/noisy_ema.pt", script="train.py"),
                          "--init_from checkpoints/noisy_ema.pt: a --task classifier checkpoint", "--task diffusion")
    assert_one_line_error(fails("--dataset_path", image_folder, *common, "--run_name", "x", "--t_min", "12",
                                "--t_max", "3", script="train.py"), "--t_min 12 --t_max 3")
