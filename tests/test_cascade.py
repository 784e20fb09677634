"""cascade.py (image conditioning, conditioning augmentation), the image-conditioned UNet, the noisy
classifier, paired image folders, and realesrgan.py's RRDBNet."""
import os

import pytest
import torch
from PIL import Image

import cascade
from conftest import randomise_zero_inits
from ddpm import GaussianDiffusion
from model import build_classifier, build_model, resolve_model_config
from realesrgan import RRDBNet, load_realesrgan, realesrgan_upscale
from utils import PairedImageDataset, UsageError

TINY = dict(image_size=16, base_channels=16, channel_mults=[1, 2], num_res_blocks=1)


def test_low_res_condition_has_the_output_size_and_keeps_what_a_low_res_image_can_hold():
    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    low = cascade.downsample(x0, 4)
    assert low.shape == (2, 3, 4, 4) and cascade.low_res_condition(x0, 4).shape == x0.shape
    # A constant image survives the trip exactly; the mean of each image is kept by the antialiased shrink.
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert torch.allclose(cascade.low_res_condition(flat, 8), flat, atol=1e-5)
    assert torch.allclose(low.mean((2, 3)), x0.mean((2, 3)), atol=0.05)


def test_conditioning_augmentation_is_the_forward_process_at_level_s():
    """CDM conditioning augmentation: c_s ~ N(sqrt(alpha_bar_s) c, (1 - alpha_bar_s) I) (DDPM eq. 4)."""
    diffusion = GaussianDiffusion(timesteps=100)
    torch.manual_seed(0)
    cond = torch.full((4000, 1, 4, 4), 0.5)
    s = torch.full((4000,), 30)
    noisy = cascade.augment_condition(diffusion, cond, s)
    ab = diffusion.alphas_cumprod[30]
    assert abs(noisy.mean().item() - ab.sqrt().item() * 0.5) < 0.01
    assert abs(noisy.std().item() - (1 - ab).sqrt().item()) < 0.01
    levels = cascade.random_augmentation_levels(10000, 7, "cpu")
    assert levels.min() == 0 and levels.max() == 7  # inclusive of both ends
    # At sampling, one fixed level for all; None means no augmentation at all.
    low = torch.zeros(3, 1, 4, 4)
    c, c_t = cascade.sr_condition(diffusion, low, 16, 5)
    assert c.shape == (3, 1, 16, 16) and c_t.tolist() == [5, 5, 5]
    c, c_t = cascade.sr_condition(diffusion, low, 16, None)
    assert c_t is None and torch.equal(c, torch.zeros(3, 1, 16, 16))


def test_image_conditioned_unet_sees_its_condition_and_level():
    model = randomise_zero_inits(build_model(dict(TINY, cond_channels=1, cond_augment=True)))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([4, 9])
    c = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        base = cascade.conditioned(model, c, torch.tensor([0, 0]))(x, t)
        assert not torch.allclose(base, cascade.conditioned(model, c + 1, torch.tensor([0, 0]))(x, t))
        assert not torch.allclose(base, cascade.conditioned(model, c, torch.tensor([50, 50]))(x, t))
    with pytest.raises(ValueError, match="image-conditioned"):
        model(x, t)  # no condition given
    # Old checkpoints (saved before these settings existed) resolve to an unconditioned UNet.
    config = resolve_model_config(image_size=16)
    assert config["cond_channels"] == 0 and config["cond_augment"] is False


def test_noisy_classifier_gives_logits_that_depend_on_t():
    classifier = randomise_zero_inits(build_classifier(dict(TINY, in_channels=1, num_classes=5)))
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        a, b = classifier(x, torch.tensor([0, 0, 0])), classifier(x, torch.tensor([19, 19, 19]))
    assert a.shape == (3, 5) and not torch.allclose(a, b)


def test_paired_folders_pair_by_name_whatever_the_extension(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "sketches").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "photos" / f"{name}.jpg")
    for name in ("a", "b", "z"):
        Image.new("L", (20, 20), 90).save(tmp_path / "sketches" / f"{name}.png")
    with pytest.warns(UserWarning, match="2 images have no partner"):
        data = PairedImageDataset(tmp_path / "photos", tmp_path / "sketches", 8)
    assert len(data) == 2 and data.channels == 3 and data.input_channels == 1
    target, source = data[0]
    assert target.shape == (3, 8, 8) and source.shape == (1, 8, 8) and source.dtype == torch.uint8
    (tmp_path / "other").mkdir()
    Image.new("L", (20, 20)).save(tmp_path / "other" / "q.png")
    with pytest.raises(UsageError, match="--cond_path .* none of its 1 images has a partner"):
        PairedImageDataset(tmp_path / "photos", tmp_path / "other", 8)


def test_paired_folders_leave_out_unreadable_pairs_and_skip_truncated_ones_with_a_warning(tmp_path):
    """As ImageFolderDataset: a file that is no image drops its pair when the dataset is built; one that
    fails only while decoding (header fine, pixels cut) is named and a neighbouring pair served instead."""
    for folder in ("photos", "sketches"):
        (tmp_path / folder).mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "photos" / f"{name}.png")
        Image.new("L", (20, 20), 90).save(tmp_path / "sketches" / f"{name}.png")
    (tmp_path / "sketches" / "b.png").write_bytes(b"not an image")
    noise = torch.randint(0, 256, (128, 128, 3), dtype=torch.uint8).numpy()
    Image.fromarray(noise).save(tmp_path / "big.jpg", quality=95)
    data = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "photos" / "c.jpg").write_bytes(data[: len(data) // 2])  # replaces c.png: header fine, pixels cut
    (tmp_path / "photos" / "c.png").unlink()
    with pytest.warns(UserWarning, match="b.png"):
        pairs = PairedImageDataset(tmp_path / "photos", tmp_path / "sketches", 8)
    assert [os.path.basename(t) for t, _ in pairs.pairs] == ["a.png", "c.jpg"]
    with pytest.warns(UserWarning, match="c.jpg"):
        target, source = pairs[1]
    assert target.shape == (3, 8, 8) and source.shape == (1, 8, 8)  # pair a, served in c's place
    (tmp_path / "sketches" / "a.png").write_bytes(b"not an image either")
    (tmp_path / "sketches" / "c.png").write_bytes(b"nor this")
    with pytest.warns(UserWarning), pytest.raises(UsageError, match="no pair of images could be read"):
        PairedImageDataset(tmp_path / "photos", tmp_path / "sketches", 8)


def test_rrdbnet_has_the_published_realesrgan_x4plus_layout(tmp_path):
    model = RRDBNet()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 16_697_987   # RealESRGAN_x4plus.pth's count
    assert len(state) == 702
    assert state["conv_first.weight"].shape == (64, 3, 3, 3)
    assert state["body.22.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert state["conv_up2.weight"].shape == (64, 64, 3, 3) and state["conv_last.weight"].shape == (3, 64, 3, 3)
    # The published file stores the weights under 'params_ema'; strict loading round-trips them.
    torch.save({"params_ema": state}, tmp_path / "RealESRGAN_x4plus.pth")
    loaded = load_realesrgan(str(tmp_path / "RealESRGAN_x4plus.pth"))
    assert torch.equal(loaded.state_dict()["body.3.rdb2.conv4.weight"], state["body.3.rdb2.conv4.weight"])
    grey = torch.randint(0, 256, (2, 1, 6, 6), dtype=torch.uint8)
    assert realesrgan_upscale(loaded, grey).shape == (2, 1, 24, 24)   # grayscale in, grayscale out, 4x
    with pytest.raises(UsageError, match="download RealESRGAN_x4plus.pth"):
        load_realesrgan(str(tmp_path / "missing.pth"))
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(1)}}, tmp_path / "wrong.pth")
    with pytest.raises(UsageError, match="not the RealESRGAN_x4plus layout"):
        load_realesrgan(str(tmp_path / "wrong.pth"))


def test_cascade_upscale_conditions_every_batch_on_its_own_low_res_images_in_order():
    """CDM's cascade: each output is decoded with its own base sample, upsampled to the SR model's size,
    as the conditioning image. A fake SR 'network' that returns its conditioning image and a generate()
    that calls it once make the output exactly the upsampled inputs, in order, batch after batch."""
    diffusion = GaussianDiffusion(timesteps=50)
    low = torch.rand(5, 3, 8, 8) * 2 - 1

    def sr_model(x, t, y=None, cond=None, cond_t=None):
        assert cond.shape == x.shape == (len(x), 3, 16, 16) and cond_t is None
        return cond

    def generate(network, noise):
        return network(noise, torch.zeros(len(noise), dtype=torch.long))

    out = cascade.cascade_upscale(diffusion, sr_model, dict(low_res=8, aug_max_t=0), low, 16, generate, batch_size=2)
    assert out.shape == (5, 3, 16, 16) and torch.allclose(out, cascade.upsample(low, 16))
    # With conditioning augmentation, the saved level s reaches the network with every call.
    seen = []
    cascade.cascade_upscale(diffusion, lambda x, t, y=None, cond=None, cond_t=None: seen.append(cond_t) or cond,
                            dict(low_res=8, aug_max_t=10, sample_aug_t=3), low, 16, generate, batch_size=2)
    assert [s.tolist() for s in seen] == [[3, 3], [3, 3], [3]]
