"""sample.py --weights ema|swa|raw: which of a checkpoint's weight sets draws the samples. The files are
written by hand in the layout of train.py's checkpoint_states, each set with its own weights, so that a
wrong pick cannot pass unnoticed."""
import pytest
import torch
from PIL import Image

from conftest import run_script
from ddpm import GaussianDiffusion
from model import build_model, resolve_model_config
from sample import load_diffusion_model
from utils import UsageError

TINY_MODEL = dict(image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1)
WEIGHT_KEYS = {"ema": "ema", "swa": "swa", "raw": "model"}  # --weights -> where the set lives in the file


def weight_set(model, offset):
    """The model's state dict with every floating-point value shifted by offset: a recognisable set."""
    return {k: v + offset if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}


def write_checkpoints(folder, swa=True):
    """<run>_ema.pt (kind ema) and <run>.pt (kind full) with distinct ema, swa and raw weights."""
    model_config = resolve_model_config(**TINY_MODEL)
    model = build_model(model_config)
    sets = dict(ema=weight_set(model, 0.01), swa=weight_set(model, 0.02), model=weight_set(model, 0.03))
    describes_itself = dict(task="diffusion", model_config=model_config,
                            diffusion_config=GaussianDiffusion(timesteps=10).config(), class_names=[], step=7,
                            conditioning={}, p_uncond=0.0)
    averaged = dict(ema=sets["ema"], **(dict(swa=sets["swa"], swa_count=5) if swa else {}))
    ema_path, full_path = folder / "run_ema.pt", folder / "run.pt"
    torch.save(dict(kind="ema", **averaged, **describes_itself), ema_path)
    torch.save(dict(kind="full", model=sets["model"], optimizer={}, config={}, **averaged, **describes_itself),
               full_path)
    return ema_path, full_path, sets


def assert_weights(model, expected):
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("weights", ["ema", "swa", "raw"])
def test_full_checkpoint_gives_each_weight_set(tmp_path, weights):
    _, full_path, sets = write_checkpoints(tmp_path)
    _, _, model = load_diffusion_model(str(full_path), "--ckpt", "cpu", weights=weights)
    assert_weights(model, sets[WEIGHT_KEYS[weights]])


@pytest.mark.parametrize("weights", ["ema", "swa"])
def test_ema_file_gives_the_averaged_weight_sets(tmp_path, weights):
    ema_path, _, sets = write_checkpoints(tmp_path)
    _, _, model = load_diffusion_model(str(ema_path), "--ckpt", "cpu", weights=weights)
    assert_weights(model, sets[weights])


def test_ema_is_the_default(tmp_path):
    ema_path, _, sets = write_checkpoints(tmp_path)
    _, _, model = load_diffusion_model(str(ema_path), "--ckpt", "cpu")
    assert_weights(model, sets["ema"])


def test_raw_weights_from_the_ema_file_name_the_full_checkpoint(tmp_path):
    ema_path, full_path, _ = write_checkpoints(tmp_path)
    with pytest.raises(UsageError, match=r"raw weights are only in the full checkpoint .*run\.pt$") as error:
        load_diffusion_model(str(ema_path), "--ckpt", "cpu", weights="raw")
    assert str(error.value).endswith(str(full_path)) and "\n" not in str(error.value)


@pytest.mark.parametrize("which", ["ema", "full"])
def test_swa_weights_from_a_run_without_swa_say_to_use_ema(tmp_path, which):
    ema_path, full_path, _ = write_checkpoints(tmp_path, swa=False)
    with pytest.raises(UsageError, match=r"no --swa_start \(or had not reached it\).*--weights ema"):
        load_diffusion_model(str(ema_path if which == "ema" else full_path), "--ckpt", "cpu", weights="swa")


def test_cli_samples_with_swa_weights_and_says_so(tmp_path):
    ema_path, _, _ = write_checkpoints(tmp_path)
    result = run_script("sample.py", "--ckpt", ema_path, "--weights", "swa", "--steps", "2", "--num_samples", "2",
                        "--device", "cpu", cwd=tmp_path)
    assert "SWA weights (mean of 5 models)" in result.stdout
    # named for the weights too, so it does not overwrite the EMA grid samples/run_ema.png
    assert Image.open(tmp_path / "samples" / "run_ema_swa.png").size == (2 + 1 * 10, 2 + 2 * 10)  # two 8x8 images
