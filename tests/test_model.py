"""The UNet: shapes, conditioning on t and y, rebuilding from a plain config, clear size errors, and
gradient checkpointing that changes memory, not numbers."""
import pytest
import torch

from conftest import randomise_zero_inits
from model import (AttentionBlock, Dropout, ResBlock, build_classifier, build_model, check_network_settings,
                   count_parameters, default_attention_resolutions, resolve_model_config, timestep_embedding)
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
    # An odd size (an odd --base_channels): the same sines and cosines, then one column of zeros.
    odd = timestep_embedding(torch.tensor([0, 1, 500]), 33)
    assert odd.shape == (3, 33) and torch.equal(odd[:, :32], e) and torch.equal(odd[:, 32], torch.zeros(3))
    model = build_model(dict(image_size=8, base_channels=5, channel_mults=[1, 2], num_res_blocks=1))
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([0, 9])).shape == (2, 3, 8, 8)


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


def test_default_attention_never_goes_above_16x16():
    """8x8 and below; else the lowest level up to DDPM's 16x16; else only the middle block attends."""
    assert default_attention_resolutions(32, [1, 2, 2]) == [8]
    assert default_attention_resolutions(256, [1, 1, 2, 2, 4, 4]) == [8]
    assert default_attention_resolutions(96, [1, 2, 2, 2]) == [12]   # 96 48 24 12: the lowest level
    assert default_attention_resolutions(32, [1, 2]) == [16]
    assert default_attention_resolutions(32, [1]) == []              # 1024-token attention in 5 blocks, before
    model = build_model(dict(image_size=32, channel_mults=[1], num_res_blocks=1, base_channels=8))
    assert sum(isinstance(m, AttentionBlock) for m in model.modules()) == 1  # the middle block's


def test_bad_network_settings_are_clear_errors():
    with pytest.raises(UsageError, match="--channel_mults 1 0: each multiplier must be at least 1"):
        build_model(dict(image_size=16, channel_mults=[1, 0]))
    with pytest.raises(UsageError, match="--attention_resolutions 32: .* the levels are 16 8"):
        check_network_settings(16, [1, 2], [8, 32])
    check_network_settings(16, [1, 2], [16, 8])  # both are level sizes
    check_network_settings(16, [1, 2], [])       # none: only the middle block attends


def test_image_size_the_unet_cannot_halve_is_a_clear_error():
    with pytest.raises(UsageError, match=r"--image_size 30: .*divisible by 4"):
        build_model(dict(image_size=30, channel_mults=[1, 2, 2]))


def test_wrong_input_shape_is_a_clear_error():
    model = build_model(dict(image_size=16, **TINY))
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([0]))


# Gradient checkpointing (Chen et al. 2016; model.run_block): the same numbers for less memory.
CHECKPOINT_TINY = dict(image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                       attention_resolutions=[4], head_channels=8, dropout=0.3)


def loss_and_gradients(model, checkpointed, forward):
    """One forward and backward with the dropout masks fixed by the seed -> (loss, {name: gradient})."""
    model.grad_checkpointing = checkpointed
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = forward(model).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("network", ["unet", "classifier"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(network):
    """Recomputing each block in the backward pass replays the same dropout masks (checkpoint restores
    the RNG state), so the loss and every gradient match the ordinary backward pass."""
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 17]), torch.tensor([0, 2])
    if network == "unet":
        model = randomise_zero_inits(build_model(dict(num_classes=3, **CHECKPOINT_TINY))).train()
        forward = lambda m: m(x, t, y)  # noqa: E731
    else:
        model = randomise_zero_inits(build_classifier(dict(num_classes=3, **CHECKPOINT_TINY))).train()
        forward = lambda m: m(x, t)  # noqa: E731
    assert any(isinstance(m, AttentionBlock) for m in model.modules())
    loss, grads = loss_and_gradients(model, False, forward)
    loss_checkpointed, grads_checkpointed = loss_and_gradients(model, True, forward)
    assert torch.allclose(loss, loss_checkpointed, rtol=0, atol=1e-6)
    assert grads.keys() == grads_checkpointed.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_checkpointed[name], rtol=0, atol=1e-6), name
    assert "grad_checkpointing" not in resolve_model_config()  # a runtime switch, not a saved setting


def test_channels_last_gives_the_same_loss_and_gradients_up_to_rounding():
    """--channels_last stores activations as NHWC: a memory layout, not other arithmetic, so one forward
    and backward agree with NCHW to float rounding (dropout off: its masks are drawn in memory order)."""
    import copy
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 17]), torch.tensor([0, 2])
    model = randomise_zero_inits(build_model(dict(num_classes=3, **dict(CHECKPOINT_TINY, dropout=0.0)))).train()
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert nhwc.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    loss, grads = loss_and_gradients(model, False, lambda m: m(x, t, y))
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    loss_nhwc, grads_nhwc = loss_and_gradients(nhwc, False, lambda m: m(x_nhwc, t, y))
    assert torch.allclose(loss, loss_nhwc, rtol=1e-5, atol=0)
    for name in grads:
        scale = grads[name].abs().max().clamp_min(1e-12)
        assert torch.allclose(grads[name] / scale, grads_nhwc[name] / scale, rtol=0, atol=1e-4), name


def test_gradient_checkpointing_recomputes_each_block_in_the_backward_pass_and_never_when_sampling():
    model = build_model(dict(num_classes=3, **CHECKPOINT_TINY))
    calls = []
    # A pre-hook: torch stops a recomputation once it has every tensor the backward needs, which can be
    # before a block's forward returns (a forward hook would then miss it), never before it starts.
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    for block in blocks:
        block.register_forward_pre_hook(lambda module, inputs: calls.append(module))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 17])

    def calls_per_block(checkpointed, grad=True):
        model.grad_checkpointing = checkpointed
        calls.clear()
        with torch.set_grad_enabled(grad):
            out = model(x, t).sum()
        assert len(calls) == len(blocks)  # the forward pass: each block once
        if grad:
            out.backward()
        return {calls.count(block) for block in blocks}

    assert calls_per_block(False) == {1}
    assert calls_per_block(True) == {2}                # forward, then recomputed by backward
    assert calls_per_block(True, grad=False) == {1}   # sampling: nothing to recompute, nothing checkpointed


# model.Dropout: nn.Dropout's distribution with a cheaper mask (Srivastava et al. 2014, inverted dropout).
def test_dropout_keeps_each_value_with_probability_1_minus_p_and_scales_it_by_1_over_1_minus_p():
    torch.manual_seed(0)
    dropout, x = Dropout(0.1).train(), torch.rand(64, 32, 16, 16) + 0.5  # no zeros before the mask
    assert dropout.threshold == 3277 and abs(dropout.scale * 0.9 - 1) < 1e-5  # p to within 2^-16
    out = dropout(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003                  # 524,288 draws: 0.0004 std
    assert torch.allclose(out[kept], x[kept] * dropout.scale)              # inverted dropout's scale
    assert abs(out.mean().item() / x.mean().item() - 1) < 0.005            # the expectation is unchanged
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    out = dropout(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float() * dropout.scale)        # d out / d x: the same mask, scaled


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropouts_cpu_mask_is_uniform_in_each_quarter_of_a_64_bit_draw(p):
    """model.random_15_bit_integers_like cuts each int64 draw into four 15-bit integers: every quarter
    (elements 4k, 4k + 1, 4k + 2, 4k + 3 of the memory order) must keep with probability 1 - p, the last
    one too, whose top bit is always 0; and two neighbouring quarters must be independent."""
    torch.manual_seed(0)
    keep = Dropout(p).train()(torch.ones(2**20)) != 0                      # [2^20], 262,144 per quarter
    quarters = keep.view(-1, 4).float()
    for quarter in range(4):
        assert abs(quarters[:, quarter].mean().item() - (1 - p)) < 0.005, quarter   # std <= 0.001
    both = (quarters[:, 2] * quarters[:, 3]).mean().item()
    assert abs(both - (1 - p) ** 2) < 0.005


def test_dropout_under_torch_compile_draws_floats_with_the_same_rounded_p(monkeypatch):
    """Inside torch.compile (which failed on the 64-bit draws' dtype view with dynamic shapes, and has
    fast random numbers of its own) the CPU mask comes from rand_like, compared with the same rounded p."""
    import model

    def not_here(x):
        raise AssertionError("the 15-bit integers are for eager CPU runs only")

    monkeypatch.setattr(model, "random_15_bit_integers_like", not_here)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    dropout, x = Dropout(0.1).train(), torch.rand(2**18) + 0.5
    out = dropout(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - 3277 / 2**15)) < 0.003
    assert torch.allclose(out[kept], x[kept] * dropout.scale)


def test_dropout_is_the_identity_in_eval_mode_and_at_p_0_and_keeps_dtype_and_layout():
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0).train()(x) is x
    out = Dropout(0.5).train()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(UsageError, match="--dropout 1.0"):
        Dropout(1.0)


@pytest.mark.parametrize("base_channels", [50, 56])
def test_channel_counts_that_are_not_multiples_of_the_group_or_head_size_still_build_and_run(base_channels):
    """train.py accepts any --base_channels >= 1. GroupNorm needs a group count that divides the channels
    (50: not 4, so 2) and attention a head count that does (112 at the lower level: not 3, so 2); multiples
    of 4 and of 32 keep the counts they always had (32 groups at 128 channels, 4 heads of 32 at 128)."""
    from model import group_count
    for channels in (50, 56, 100, 112, 128, 256):
        assert channels % group_count(channels) == 0
        heads = AttentionBlock(channels, head_channels=32).heads
        assert channels % heads == 0 and 1 <= heads <= max(1, channels // 32)
    assert group_count(128) == 32 and AttentionBlock(128, head_channels=32).heads == 4
    model = build_model(dict(image_size=16, in_channels=3, base_channels=base_channels, channel_mults=[1, 2],
                             num_res_blocks=1, attention_resolutions=[8]))
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([1, 5])).shape == (2, 3, 16, 16)
