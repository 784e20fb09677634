"""
experts.py: an ensemble of expert denoisers (eDiff-I: Balaji et al. 2022, arXiv 2211.01324, the idea
its project page calls "Denoising Experts").

One network that serves every noise level does two different jobs. At large t, x_t is almost pure
noise and the network decides what the image will be: its layout, its class, its colours. At small
t the image is already there and the network only removes the last grain of noise, a job about
textures and edges. eDiff-I gives each job its own network: several denoisers, each trained on one
interval of t, and a sampler that asks, at every step, the expert whose interval holds that step's
t. The sampler itself does not change: the ensemble is one more callable model(x_t, t, y), so
Algorithm 2, respaced DDPM, DDIM and both kinds of guidance run on it unchanged.

    train.py --t_min 0 --t_max 499 ...      an expert for t in {0, ..., 499} (code t, ddpm.py's convention)
    train.py --t_min 500 --t_max 999 ...    and one for {500, ..., 999}
    sample.py --ckpt checkpoints/low_ema.pt --ckpt checkpoints/high_ema.pt

An expert's training is Algorithm 1 with line 3 restricted: t is drawn uniformly from its interval
instead of from all T steps (improved_ddpm.TimestepSampler with t_range). Its checkpoint stores the
interval as t_range = [t_min, t_max]; sample.py reads it from there. The paper trains one model on
all t first and fine-tunes the experts from it (train.py --init_from base_ema.pt starts a run from a
checkpoint's EMA weights); that detail is recalled, not checked against the paper, as is its section
number (../shared/PAPERS.md).

The experts' intervals must cover 0..T-1 exactly once: a gap would leave some t without a network,
an overlap would make the choice ambiguous. Both are one-line errors (check_coverage).
"""
import torch

from utils import UsageError


def expert_range(state):
    """The interval of t [t_min, t_max] (inclusive, code t) a checkpoint was trained on: its t_range,
    or all of 0..T-1 for a checkpoint trained on every t (and those written before t_range existed)."""
    timesteps = state["diffusion_config"]["timesteps"]
    t_min, t_max = state.get("t_range") or (0, timesteps - 1)
    return int(t_min), int(t_max)


def check_coverage(ranges, timesteps, names):
    """The intervals ranges [(t_min, t_max)] of the files names must tile 0..T-1: sorted by t_min, the
    first starts at 0, each next one starts right after the previous one ends, the last ends at T-1."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    expected = 0
    for i in order:
        t_min, t_max = ranges[i]
        if t_min > expected:
            raise UsageError(f"--ckpt: no expert covers t = {expected}..{t_min - 1} (of 0..{timesteps - 1}); "
                             f"{names[i]} starts at {t_min}. Train one with --t_min {expected} --t_max {t_min - 1}")
        if t_min < expected:
            raise UsageError(f"--ckpt: {names[i]} (t = {t_min}..{t_max}) overlaps another expert, which already "
                             f"covers up to t = {expected - 1}; give each t to exactly one expert")
        expected = t_max + 1
    if expected != timesteps:
        raise UsageError(f"--ckpt: no expert covers t = {expected}..{timesteps - 1} (the model's T is {timesteps}); "
                         f"train one with --t_min {expected} --t_max {timesteps - 1}")


def check_compatible(states, names):
    """Experts must be interchangeable at their boundaries: the same diffusion (T, schedule, what the
    network predicts, learned variances), the same image size and channels, the same classes, the same
    task. Only the weights, the width and the interval may differ."""
    def signature(state):
        d, m = state["diffusion_config"], state["model_config"]
        return dict(timesteps=d["timesteps"], schedule=d["schedule"], prediction=d.get("prediction", "eps"),
                    learn_sigma=d.get("learn_sigma", False), image_size=m["image_size"],
                    in_channels=m["in_channels"], class_names=state.get("class_names") or [],
                    task=state.get("task", "diffusion"), conditioning=state.get("conditioning") or {})
    first = signature(states[0])
    for state, name in zip(states[1:], names[1:]):
        other = signature(state)
        differ = [key for key in first if first[key] != other[key]]
        if differ:
            key = differ[0]
            raise UsageError(f"--ckpt {name}: its {key} ({other[key]}) differs from {names[0]}'s ({first[key]}); "
                             "experts must share the diffusion, image size, classes and task")


class ExpertEnsemble(torch.nn.Module):
    """model(x_t, t, y) that sends each image to the expert whose interval holds its t.

    experts: networks, each model(x_t [B x C x H x W], t [B], y [B] or None, **extra) -> [B x ...]
    ranges:  their intervals [(t_min, t_max)], inclusive, tiling 0..T-1 (check_coverage)
    Inside a sampler every image of a batch has the same t, so one expert handles the whole batch; a
    batch with mixed t (training-style) is split, each part computed by its expert, and put back in
    order. Tensors in extra (conditioning images) are split the same way."""

    def __init__(self, experts, ranges):
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)
        self.ranges = [(int(a), int(b)) for a, b in ranges]

    def forward(self, x, t, y=None, **extra):
        out = None
        served = torch.zeros_like(t, dtype=torch.bool)
        for expert, (t_min, t_max) in zip(self.experts, self.ranges):
            mine = (t >= t_min) & (t <= t_max)                               # [B]
            if not bool(mine.any()):
                continue
            if bool(mine.all()):                                             # the sampler's case: no copies
                return expert(x, t, y, **extra)
            part = {k: v[mine] if torch.is_tensor(v) and v.shape[:1] == t.shape else v for k, v in extra.items()}
            result = expert(x[mine], t[mine], y[mine] if y is not None else None, **part)
            if out is None:
                out = result.new_empty((len(t),) + result.shape[1:])
            out[mine] = result
            served |= mine
        if out is None or not bool(served.all()):
            missing = sorted(set(t[~served].tolist()))
            raise ValueError(f"no expert for t = {missing[:5]} (intervals {self.ranges})")
        return out
