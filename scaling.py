"""
scaling.py: training at scale and without losing work, the machinery train.py's loop leans on.
Nothing here changes what a step computes (that is Algorithm 1, ddpm.py); it decides on which
processes, with which random numbers, and what survives when the run is stopped.

    several processes   setup_distributed (torchrun's RANK / LOCAL_RANK / WORLD_SIZE), ResumableSampler
                        (DistributedSampler that restarts mid-epoch), SharedRandomness (the loss's random
                        numbers drawn for the global batch, so W processes train what one would),
                        rng_states / restore_rng_states (every random stream, saved and put back),
                        step_statistics (the loss and the stop flag, averaged over processes)
    not losing work     StopSignals (SIGTERM and Ctrl-C stop on a step boundary), write_checkpoints
                        (atomic, --keep_last rotation), weights_are_finite
    the log             TrainingLog (loss.csv, loss.png, TensorBoard; start_log cuts loss.csv back on resume)
    speed               compile_or_fallback (torch.compile, or a note where it cannot run)

See the README, "Scaling up". Imports only utils.py and torch.
"""
import contextlib
import csv
import itertools
import math
import os
import re
import signal
import sys

import torch
import torch.distributed as dist

from utils import UsageError, link_checkpoint, pick_device, plot_loss, save_checkpoint


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun + DistributedDataParallel), and the data and randomness they share
# ---------------------------------------------------------------------------------------------

def setup_distributed(device_name):
    """torchrun starts one process per device and tells each, in environment variables, its RANK
    (0 .. W-1 over all nodes), its LOCAL_RANK (on this node) and the WORLD_SIZE W. Without torchrun
    this is process 0 of 1 and nothing is set up. Returns (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "mps":
        raise UsageError("torchrun with --device mps: several processes need CUDA GPUs or the CPU (--device cpu)")
    if device.type == "cuda":  # one GPU per process; NCCL moves the gradients between them
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


class ResumableSampler(torch.utils.data.DistributedSampler):
    """torch's DistributedSampler: each epoch a fresh shuffle of the whole dataset, seeded by
    seed + epoch so every process computes the same one, of which process r reads items
    r, r + W, r + 2W, ... (W = 1: the whole shuffle). One addition makes resuming exact: `start`
    skips the items this process already read earlier in the epoch."""

    def __init__(self, dataset, rank, world_size, seed):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


def endless_batches(loader, sampler, batches_done):
    """Batches forever, a new shuffle each epoch, beginning after the first batches_done of them:
    epoch batches_done // (batches per epoch), that far in. A resumed run passes step x accumulation."""
    per_epoch = sampler.num_samples // loader.batch_size
    epoch, skip = divmod(batches_done, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.start = skip * loader.batch_size
        yield from loader
        epoch, skip = epoch + 1, 0


class SharedRandomness:
    """The random numbers of the training loss (t, the noise eps, flips, label drops, augmentation
    levels) come from one generator that every process seeds alike and draws from for the whole
    global batch of W x B images; each process keeps its own rows r, r + W, ... (the rows its
    ResumableSampler gives it images for). So W processes with --batch_size B draw exactly the
    numbers one process with batch W x B would, and the generator's state is all that a resumed run
    needs. (Dropout uses torch's global generator instead, seeded differently on each process.)"""

    def __init__(self, seed, rank, world_size, device):
        self.generator = torch.Generator(device).manual_seed(seed)
        self.rank, self.world_size, self.device = rank, world_size, device

    def rows(self, whole):
        """This process's rows of a global-batch tensor [W*B ...] -> [B ...]."""
        return whole[self.rank::self.world_size]

    def rand(self, b):
        return self.rows(torch.rand(b * self.world_size, generator=self.generator, device=self.device))

    def randint(self, high, b):
        return self.rows(torch.randint(0, high, (b * self.world_size,), generator=self.generator, device=self.device))

    def randn(self, shape):
        whole = torch.randn((shape[0] * self.world_size, *shape[1:]), generator=self.generator, device=self.device)
        return self.rows(whole)

    def gather_rows(self, mine):
        """The inverse of rows: every process's [B] rows -> the global batch [W*B], in global order."""
        if self.world_size == 1:
            return mine
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine.contiguous())
        return torch.stack(parts, dim=1).reshape(-1)  # [B x W]: element (j, r) is global row j*W + r


def rng_states(randomness, device, world_size):
    """Every random stream a resumed run needs, as a plain dict: torch's global generator on each
    process, CUDA's on each GPU (dropout on a GPU draws from it), Apple MPS's (the same, on a Mac: one
    process), and the shared one (SharedRandomness)."""
    mine = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    everyone = [mine]
    if world_size > 1:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
    return dict(torch=[s["torch"] for s in everyone],
                cuda=[s["cuda"] for s in everyone] if device.type == "cuda" else [],
                **({"mps": torch.mps.get_rng_state()} if device.type == "mps" else {}),
                shared=randomness.generator.get_state())


@contextlib.contextmanager
def forked_rng(device):
    """A copy of torch's random state for a side task (a sample grid), put back afterwards: CPU's, and the
    device's own on CUDA or Apple MPS, where dropout draws from it. Drawing a grid, or not, then changes
    nothing in the training that follows. fork_rng's own device handling differs across torch versions
    (its default device type was CUDA), so MPS's state is kept by hand."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        mps_state = torch.mps.get_rng_state() if device.type == "mps" else None
        try:
            yield
        finally:
            if mps_state is not None:
                torch.mps.set_rng_state(mps_state)


def restore_rng_states(rng, randomness, device, rank, world_size):
    """Put back what rng_states saved, so the resumed run draws what an uninterrupted one would.
    Returns False, restoring nothing, when the states were saved by an older train.py or by another
    number of processes: the caller then reseeds and says that the random numbers differ."""
    if not (isinstance(rng["torch"], list) and len(rng["torch"]) == world_size and "shared" in rng):
        return False
    torch.set_rng_state(rng["torch"][rank])
    if device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state(rng["cuda"][rank], device)
    if device.type == "mps" and "mps" in rng:  # runs saved before this key resume, drawing other masks
        torch.mps.set_rng_state(rng["mps"])
    randomness.generator.set_state(rng["shared"])
    return True


def step_statistics(losses, t, timesteps, stop_requested, world_size, seconds=0.0, weights=None):
    """This step's per-image losses and t [k*B] -> (mean loss, [mean loss of the images whose t lies in
    each quarter of 0 .. T-1, NaN where none did], whether any process was asked to stop, the training
    seconds so far averaged over processes), over all processes with one all-reduce. The quarters show
    which noise levels are hard (Improved DDPM shows the terms at small t dominating the variational
    bound; its figure number is unconfirmed). Every process gets the same seconds, so a time budget
    (--max_minutes) sets the same learning rate and stops every process at the same step.
    weights [k*B]: the loss-aware sampler's importance weights w = 1 / (n p_t), already in losses (w L).
    Each quarter is then sum(w L) / sum(w), the uniform-t mean; dividing by the count would give about
    the same number in every quarter, since p_t follows the loss."""
    quarter = (t * 4 // timesteps).clamp(max=3)
    stats = torch.zeros(12, device=losses.device)  # float32 keeps a day's seconds to 0.01 s
    stats[0], stats[1] = losses.float().sum(), losses.numel()
    stats[2:6].index_add_(0, quarter, losses.float())
    stats[6:10].index_add_(0, quarter, torch.ones_like(losses, dtype=torch.float) if weights is None else weights.float())
    stats[10] = float(stop_requested)
    stats[11] = seconds
    if world_size > 1:
        dist.all_reduce(stats)  # summed over processes: means of the global batch
    stats = stats.cpu()
    by_quarter = [(stats[2 + q] / stats[6 + q]).item() if stats[6 + q] > 0 else float("nan") for q in range(4)]
    return (stats[0] / stats[1]).item(), by_quarter, bool(stats[10] > 0), stats[11].item() / world_size


# ---------------------------------------------------------------------------------------------
# Speed, stopping, checkpoints and the log
# ---------------------------------------------------------------------------------------------

def compile_or_fallback(module, device, say):
    """torch.compile(module), or the module itself with a note where this platform cannot compile
    (no C++ compiler, an unsupported Python or OS). torch.compile only fails at the first call, so a
    tiny function is compiled and run first, as a probe."""
    try:
        probe = torch.compile(lambda x: torch.sin(x) + 1.0)
        probe(torch.zeros(4, device=device))
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        say(f"note: --compile is unavailable here ({type(error).__name__}: {reason}); training without it")
        return module
    say("note: --compile: the first step compiles the network (a minute or more), the later ones are faster")
    return torch.compile(module)


class StopSignals:
    """SIGTERM (a cluster scheduler's "time is up") and SIGINT (Ctrl-C) ask the run to stop. The step
    in progress finishes first, so the checkpoint saved on the way out lies exactly on a step boundary
    and --resume continues bit for bit; a second signal quits at once without saving (the last
    checkpoint stays). A sample grid in progress (it can take minutes) is cut short by the first."""

    def __init__(self):
        self.requested = False
        self.drawing_grid = False
        # Ctrl-C explicitly too: a process started in the background by a script (nohup ... &) inherits
        # SIGINT as ignored, and Python then installs no KeyboardInterrupt handler.
        self.before = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for sig, handler in self.before.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        again, self.requested = self.requested, True
        if again or self.drawing_grid:
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to quit without saving)", file=sys.stderr, flush=True)


def quiet_worker_signals(worker_id=None):
    """DataLoader workers' worker_init_fn. Ctrl-C, and a scheduler's SIGTERM (SLURM, systemd), reach every
    process of the group, workers included; only the main process should act on them, and it still
    needs its workers' batches to finish the step in progress before it saves.
    - SIGINT is ignored: a worker forked after StopSignals would run its handler too (a "stopping" line
      per worker), or, without it, raise KeyboardInterrupt.
    - The first SIGTERM is ignored. torch's own worker handler lets it kill the worker, and the main
      process's watch over its workers then raised a RuntimeError mid-step: no checkpoint. A second
      SIGTERM (torch or multiprocessing ending a worker that did not stop) exits with status 0.
    The main process stops the workers itself when training ends (shut_down_workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen = []

    def on_sigterm(signum, frame):
        if seen:
            os._exit(0)  # status 0: what torch's watch in the main process takes as a clean exit
        seen.append(signum)
    signal.signal(signal.SIGTERM, on_sigterm)


def shut_down_workers(loader):
    """Stop a DataLoader's persistent worker processes now, with the loader's own end-of-work messages.
    They ignore a first SIGTERM (quiet_worker_signals), which is how the interpreter's exit would end
    them. torch keeps the persistent workers' iterator in loader._iterator (private, hence the checks)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def weights_are_finite(*modules):
    return all(torch.isfinite(p).all() for m in modules if m is not None for p in m.parameters())


def write_checkpoints(full_state, ema_state, full_path, ema_path, step, keep_last):
    """Write <run>.pt and <run>_ema.pt, each atomically. With keep_last N, write step-numbered files
    instead, point the two names at them (hard links), and delete all but the N newest numbered ones.
    A kill at any moment leaves every name pointing at a complete checkpoint."""
    if keep_last == 0:
        save_checkpoint(full_state, full_path)
        save_checkpoint(ema_state, ema_path)
        return
    for state, path in ((full_state, full_path), (ema_state, ema_path)):
        stem = path[:-len(".pt")]
        numbered = f"{stem}_step{step:07d}.pt"
        save_checkpoint(state, numbered)
        link_checkpoint(numbered, path)
        folder, name = os.path.split(stem)
        pattern = re.compile(re.escape(name) + r"_step(\d{7,})\.pt$")
        kept = sorted(f for f in os.listdir(folder or ".") if pattern.match(f))
        for old in kept[:-keep_last]:
            os.remove(os.path.join(folder, old))


LOG_FIELDS = ["step", "loss", "lr", "images_per_s", "peak_memory_mb"]


def log_fields(timesteps):
    """loss.csv's columns: the step's mean loss, then its mean over each quarter of the t range."""
    edges = [(q * timesteps + 3) // 4 for q in range(5)]  # ceil(q T / 4): where step_statistics' quarters start
    return LOG_FIELDS + [f"loss_t{edges[q]}_{edges[q + 1] - 1}" for q in range(4)]


def start_log(log_path, fields, resumed_step):
    """A fresh loss.csv, or on resume the old one cut back to the resumed step (a process killed after
    logging but before saving logged steps that will now be trained again). An older layout is moved
    aside, never deleted."""
    if resumed_step is not None and os.path.isfile(log_path):
        with open(log_path, newline="") as f:
            rows = list(csv.reader(f))
        # The same columns, or the same with the quarters named by an older rule (T not divisible by 4).
        if rows and (rows[0] == fields or (len(rows[0]) == len(fields) and rows[0][:len(LOG_FIELDS)] == LOG_FIELDS
                                           and all(name.startswith("loss_t") for name in rows[0][len(LOG_FIELDS):]))):
            rows = [fields] + [r for r in rows[1:] if r and int(r[0]) <= resumed_step]
            temporary = log_path + ".tmp"
            with open(temporary, "w", newline="") as f:
                csv.writer(f).writerows(rows)
            os.replace(temporary, log_path)
            return
        os.replace(log_path, log_path[:-len(".csv")] + "_before_resume.csv")
    with open(log_path, "w", newline="") as f:
        csv.writer(f).writerow(fields)


class TrainingLog:
    """The run's log: loss.csv, one row per step (the step, the loss, its mean over each quarter of the t
    range, the learning rate, images/s and peak memory), with loss.png redrawn from the whole file at every
    flush, and the same scalars and the sample grids in TensorBoard when writer_class is given (train.py
    --tensorboard). Rows are kept in memory and appended at each checkpoint (flush), so a resumed run
    finds the log cut at the step it resumes from (start_log). Only process 0 writes: on the others
    (active False) every method does nothing."""

    def __init__(self, folder, timesteps, resumed_step=None, writer_class=None, active=True):
        self.path, self.plot_path = os.path.join(folder, "loss.csv"), os.path.join(folder, "loss.png")
        self.fields = log_fields(timesteps)
        self.rows = []  # this run's rows since the last flush
        self.active, self.writer = active, None
        if active:
            os.makedirs(folder, exist_ok=True)
            start_log(self.path, self.fields, resumed_step)
            if writer_class is not None:
                self.writer = writer_class(os.path.join(folder, "tensorboard"), purge_step=resumed_step)

    def add(self, values):
        """One step's values, in the order of self.fields."""
        if not self.active:
            return
        self.rows.append([f"{v:.6g}" if isinstance(v, float) else v for v in values])
        if self.writer is not None:
            for name, value in zip(self.fields[1:], values[1:]):
                if math.isfinite(value):
                    self.writer.add_scalar(name if name.startswith("loss") else "train/" + name, value, values[0])

    def add_image(self, path, step):
        """A sample grid (a PNG file) to TensorBoard."""
        if self.writer is not None:
            import numpy as np
            from PIL import Image
            self.writer.add_image("samples", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def flush(self):
        """Append the rows kept so far to loss.csv and redraw loss.png from the whole file."""
        if not self.active:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows(self.rows)
        self.rows.clear()
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        if len(rows) >= 2:
            by_level = {name.replace("loss_", "").replace("_", ".."): [float(r[name] or "nan") for r in rows]
                        for name in self.fields[len(LOG_FIELDS):]}
            plot_loss([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], self.plot_path, by_level)
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
