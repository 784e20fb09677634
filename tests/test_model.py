"""The UNet: shapes, conditioning on t and y, rebuilding from a plain config, and clear size errors."""
import pytest
import torch
import torch.nn.functional as F

from conftest import randomise_zero_inits
from model import AttentionBlock, build_model, count_parameters, resolve_model_config, timestep_embedding
from utils import UsageError

TINY = dict(base_channels=16, channel_mults=[1, 2], num_res_blocks=1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size,mults", [(16, [1, 2]), (32, [1, 2, 2]), (24, [1, 2, 2]), (64, [1, 1, 2, 2])])
def test_output_has_the_input_shape(channels, size, mults):
    model = build_model(dict(image_size=size, in_channels=channels, base_channels=16, channel_mults=mults,
                             num_res_blocks=1))
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == (2, channels, size, size)


def test_untrained_model_predicts_zero_so_the_first_loss_is_exactly_the_noise_variance():
    model = build_model(dict(image_size=16, **TINY))
    assert torch.count_nonzero(model(torch.randn(2, 3, 16, 16), torch.tensor([3, 7]))) == 0


def test_output_changes_when_only_t_changes():
    model = randomise_zero_inits(build_model(dict(image_size=16, **TINY)))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a, b = model(x, torch.tensor([10])), model(x, torch.tensor([11]))
    assert (a - b).abs().max() > 1e-4


def test_class_label_changes_output_and_no_label_is_the_reserved_last_row():
    model = randomise_zero_inits(build_model(dict(image_size=16, num_classes=3, **TINY)))
    assert model.class_embedding.num_embeddings == 4  # 3 classes + "no label"
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    with torch.no_grad():
        outs = [model(x, t, torch.tensor([c])) for c in range(4)]
        unlabeled = model(x, t)
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    assert torch.equal(unlabeled, outs[3])


def test_sinusoidal_embedding_shape_and_values():
    e = timestep_embedding(torch.tensor([0, 1, 500]), 32)
    assert e.shape == (3, 32)
    assert torch.equal(e[0, :16], torch.zeros(16)) and torch.equal(e[0, 16:], torch.ones(16))  # sin 0, cos 0
    assert e[1, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())  # frequency 1 first


def test_attention_block_is_softmax_attention_plus_residual():
    torch.manual_seed(0)
    block = AttentionBlock(channels=8, head_channels=4)
    torch.nn.init.normal_(block.proj.weight)
    x = torch.randn(2, 8, 3, 3)
    q, k, v = block.qkv(block.norm(x)).reshape(2, 3, 2, 4, 9).transpose(-1, -2).unbind(1)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4 ** 0.5, dim=-1)   # [B x heads x HW x HW]
    manual = x + block.proj((weights @ v).transpose(-1, -2).reshape(2, 8, 3, 3))
    assert torch.allclose(block(x), manual, atol=1e-5)


def test_config_is_plain_and_rebuilds_the_same_network():
    config = resolve_model_config(image_size=32, in_channels=1, num_classes=10)
    assert all(type(v) in (int, float, bool, list, type(None)) for v in config.values())
    assert config["attention_resolutions"] == [8] and config["out_channels"] == 1
    assert resolve_model_config(image_size=64)["attention_resolutions"] == [16]  # the lowest level
    a, b = build_model(config), build_model(config)
    b.load_state_dict(a.state_dict(), strict=True)
    assert count_parameters(a) == count_parameters(b)


def test_default_model_is_small():
    """About 1.5 M parameters: a size a 2-core CPU trains in minutes."""
    assert 1.2e6 < count_parameters(build_model({})) < 2.0e6


def test_image_size_the_unet_cannot_halve_is_a_clear_error():
    with pytest.raises(UsageError, match=r"--image_size 30: .*divisible by 4"):
        build_model(dict(image_size=30, channel_mults=[1, 2, 2]))


def test_wrong_input_shape_is_a_clear_error():
    model = build_model(dict(image_size=16, **TINY))
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([0]))
