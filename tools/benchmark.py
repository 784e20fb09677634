"""
How fast is the model, and how close to the hardware? One table (and a JSON file) for one network:
parameters, FLOPs per image, training images/s and achieved GFLOP/s, peak memory, network evaluations
per second when sampling, and images/s for each sampler and step count.

    python tools/benchmark.py                                          # the default 32x32 UNet, on CPU or GPU
    python tools/benchmark.py --ckpt checkpoints/cars_ema.pt --json images/benchmark_cars.json
    python tools/benchmark.py --image_size 64 --base_channels 64 --channel_mults 1 2 2 2 --batch_size 32

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (a multiply-add is 2 FLOPs; matrix
products and convolutions, which are nearly all of the work). Training FLOPs are those of one
forward and backward pass, about 3x the forward's. Achieved GFLOP/s = training FLOPs per image x
images/s: against the device's peak it says how much of the hardware the model uses. Training is
Algorithm 1 (ddpm.py) with AdamW on random images, without data loading, the EMA update or gradient
clipping (train.py's step does those as well; its images/s is a little lower). AdamW is the foreach
kernel, as train.py runs it on a CPU (train.py uses the fused one on CUDA).
Sampling images/s are measured by running each sampler for its step count on one batch.

    python tools/benchmark.py --vs-peers                               # side by side with the peers (CPU)

--vs-peers times our default and medium networks, in fp32 and (on a CPU with bf16 hardware) in bf16
autocast, beside lucidrains' and diffusers' UNets of the same sizes, in one run of
../shared/bench/peers.py (each model in its own process, same loop, same threads), then prints one
table: images/s and the ratio to the fastest peer of the same size, GFLOP/s against this machine's
measured peak in that precision (the fp32 and bf16 3x3-convolution and matmul peaks, machine_peak
below), sampling network evaluations/s and peak resident memory. It needs the bench's virtual
environment (bash ../shared/bench/setup.sh). The bench times each network for a few steps, and a shared
machine's speed drifts between runs, so one run's ratios can be off by a third:

    python tools/benchmark.py --vs-peers --sizes small --repeats 5 --json vs_peers_x5.json

runs it 5 times, a table each, then one table of each model's median and range over the runs, its
ratios to the fastest peer taken within each run (where peers and ours met the same machine speed).

    python tools/benchmark.py --vs-lucidrains --base_channels 128 --channel_mults 1 2 2 2 \
        --attention_resolutions 16 --batch_size 128 --train_steps 50 --samplers ddpm ddim --steps 50 \
        --settings bf16 bf16-compile bf16-cudnn fp32 --json vs_lucidrains.json        # on a GPU

--vs-lucidrains is the GPU side by side (the peers' bench is CPU-only): our network from the flags
(here the DDPM paper's CIFAR-10 layout, 38.3 M parameters) and lucidrains' Unet(dim=64, dim_mults=(1, 2,
4, 8)) (35.7 M, its README's model; flash_attn left off, which at 32x32 touches only its 4x4
attention), each in each setting in its own process, through this file's one loop (Algorithm 1 +
AdamW, then our samplers), so only the network differs. It needs `pip install
denoising-diffusion-pytorch`; without it lucidrains' rows say so and ours still run.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddim import ddim_sample  # noqa: E402
from ddpm import GaussianDiffusion  # noqa: E402
from improved_ddpm import respace  # noqa: E402
from model import build_model, check_network_settings, count_parameters, resolve_model_config  # noqa: E402
from utils import (AutocastNetwork, UsageError, cpu_has_fast_bf16, keep_freed_memory, load_checkpoint,  # noqa: E402
                   peak_memory_mb, pick_device, reset_peak_memory, resolve_amp, resolve_channels_last, typed_flags,
                   write_json)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The peers of each size in ../shared/bench/peers.py, and our contenders (tools/peer_contender.py).
PEERS = dict(small=["lucid-d32-122", "diffusers-32-64-64"], medium=["lucid-d64-122", "diffusers-64-128-128"])
CONTENDERS = dict(small=[("build", "ours-fp32"), ("build_bf16", "ours-bf16")],
                  medium=[("build_medium", "ours-medium-fp32"), ("build_medium_bf16", "ours-medium-bf16")])


def setting_words(text):
    """--settings' values: fp32 or bf16, then any of -compile and -cudnn."""
    words = text.split("-")
    if words[0] not in ("fp32", "bf16") or not set(words[1:]) <= {"compile", "cudnn"}:
        raise argparse.ArgumentTypeError(f"{text!r}: use fp32 or bf16, then optionally -compile and/or -cudnn")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Training and sampling speed, FLOPs and memory of one network.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="benchmark this checkpoint's network (else the flags below)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--base_channels", type=int, default=32)
    p.add_argument("--channel_mults", type=int, nargs="+", default=[1, 2, 2])
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--attention_resolutions", type=int, nargs="*", default=None,
                   help="resolutions with self-attention (default: model.py's; none when given without values)")
    p.add_argument("--num_classes", type=int, default=0)
    p.add_argument("--dropout", type=float, default=None, help="dropout in the residual blocks (default: model.py's)")
    p.add_argument("--batch_size", type=int, default=64, help="images per training step and per sampling batch")
    p.add_argument("--train_steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--samplers", nargs="*", default=["ddpm", "ddim"], choices=("ddpm", "ddim"),
                   help="samplers to time (none: skip timing samplers)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 50], help="sampling step counts to time")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--amp", default="off", choices=("off", "bf16", "auto"),
                   help="bf16 autocast for training; auto: as train.py --amp decides it (bf16 on a CPU with AMX "
                        "or AVX-512 BF16, fp32 on other CPUs; bf16 or fp16 on CUDA)")
    p.add_argument("--malloc", default="keep", choices=("keep", "default"),
                   help="keep: glibc keeps freed memory, as train.py sets it (utils.keep_freed_memory); "
                        "default: leave the allocator alone, to measure the difference")
    p.add_argument("--channels_last", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="weights and images in channels_last memory format; auto: as train.py decides it "
                        "(on for fp32 on a CPU; utils.resolve_channels_last)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for training (slow to start)")
    p.add_argument("--sample_amp", action="store_true",
                   help="sample under --amp's autocast too, as sample.py --amp does (default: fp32, as sample.py)")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True: cuDNN times its convolution algorithms for each "
                        "shape once and keeps the fastest (CUDA only)")
    p.add_argument("--network", default="ours", choices=("ours", "lucidrains"),
                   help="lucidrains: lucidrains/denoising-diffusion-pytorch's Unet(dim=--base_channels, "
                        "dim_mults=--channel_mults) in its own layout, timed through the same loop (needs "
                        "`pip install denoising-diffusion-pytorch`, which requirements.txt does not have)")
    p.add_argument("--profile", action="store_true",
                   help="also run 5 training steps under torch.profiler and print where their time goes, by operator")
    peers = p.add_argument_group("--vs-peers: the side-by-side table against lucidrains and diffusers")
    peers.add_argument("--vs-peers", dest="vs_peers", action="store_true",
                       help="run ../shared/bench/peers.py with our networks as contenders and print the table")
    peers.add_argument("--bench_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "bench"))
    peers.add_argument("--bench_python", default=os.environ.get("BENCH_PYTHON", "/tmp/benchvenv/bin/python"),
                       help="the bench's virtual environment (made by its setup.sh), with the peers installed")
    peers.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=("small", "medium"))
    peers.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "bf16"),
                       help="default: fp32, plus bf16 on a CPU with bf16 hardware (AMX or AVX-512 BF16); elsewhere "
                            "bf16 is emulated (13x slower than fp32 on an AVX2-only AMD EPYC) and left out unless named")
    peers.add_argument("--alloc", default="default", choices=("default", "jemalloc", "glibc-tuned"),
                       help="the bench's allocator setting for every model, peers included")
    peers.add_argument("--threads", type=int, default=2)
    peers.add_argument("--repeats", type=int, default=1,
                       help="run the bench this many times and end with each model's median (ratios to the fastest "
                            "peer taken within each run); --json then holds every run and the medians")
    gpu = p.add_argument_group("--vs-lucidrains: our network against lucidrains' Unet on this device (a GPU)")
    gpu.add_argument("--vs-lucidrains", dest="vs_lucidrains", action="store_true",
                     help="time our network (the flags above) and lucidrains' Unet(dim=--lucid_dim, "
                          "dim_mults=--lucid_mults) in each of --settings, each run in its own process")
    gpu.add_argument("--lucid_dim", type=int, default=64)
    gpu.add_argument("--lucid_mults", type=int, nargs="+", default=[1, 2, 4, 8],
                     help="with --lucid_dim 64, lucidrains' README model: 35.7 M parameters, the DDPM paper's size")
    gpu.add_argument("--settings", nargs="+", default=["fp32", "bf16", "bf16-compile"], type=setting_words,
                     help="fp32 or bf16, then optionally -compile and/or -cudnn (--cudnn_benchmark), e.g. "
                          "bf16-compile-cudnn")
    gpu.add_argument("--run_timeout", type=float, default=600, help="seconds each run may take")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.typed = typed_flags(p, argv)  # so that --ckpt can refuse network flags it would ignore
    return args


# The flags that build the network and its diffusion; with --ckpt both come from the checkpoint instead.
NETWORK_FLAGS = ("image_size", "channels", "base_channels", "channel_mults", "num_res_blocks", "attention_resolutions",
                 "num_classes", "dropout", "timesteps")


def check_args(args):
    """One-line errors for counts that would otherwise print a table of zeros or fail deep in torch, and
    for network flags that --ckpt would ignore."""
    too_small = [f"--{name} {getattr(args, name)}: must be at least 1" for name in
                 ("batch_size", "train_steps", "image_size", "channels", "base_channels")
                 if getattr(args, name) < 1]
    if args.num_classes < 0:
        too_small.append(f"--num_classes {args.num_classes}: must be 0 (unconditioned) or more")
    if too_small:
        raise UsageError(too_small[0])
    ignored = [f"--{name}" for name in NETWORK_FLAGS if name in args.typed]
    if args.ckpt and ignored:
        raise UsageError(f"{', '.join(ignored)}: the network and its T come from --ckpt {args.ckpt}; drop "
                         f"{'them' if len(ignored) > 1 else 'it'}, or drop --ckpt to build the network from the flags")


def count_flops(fn):
    """FLOPs of whatever fn() runs (FlopCounterMode counts matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def machine_peak(dtype, threads, reps=7):
    """This CPU's achievable GFLOP/s in dtype: the best of a 3x3 convolution (64 -> 64 channels, 32x32,
    batch 64, channels_last, forward) and a 2048 x 2048 matrix product, median of reps runs each. The
    bench's ../shared/bench/machine_peak.py tries more candidates (1x1 GEMMs, larger matrix products, the
    convolution's backward pass), so its fp32 figure can be higher: --vs-peers prints both (on the
    2-core Zen 4 they agreed within 5% in five runs on 2026-11-29; one run there on 2026-11-27 read 365
    against its 469). bf16 is measured the same way, so each precision's fraction of peak is against its
    own limit."""
    torch.set_num_threads(threads)
    x = torch.randn(64, 64, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(64, 64, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = {}
    for name, fn, flops in (("conv3x3", lambda: torch.nn.functional.conv2d(x, weight, padding=1),
                             2 * 64 * 64 * 9 * 32 * 32 * 64), ("matmul", lambda: a @ b, 2 * 2048 ** 3)):
        fn()
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        best[name] = flops / sorted(times)[reps // 2] / 1e9
    return max(best.values()), best


def vs_peers(args):
    """The side-by-side table: ../shared/bench/peers.py with our contenders, then our summary of it;
    with --repeats n, n such runs and then each model's median across them."""
    bench = os.path.abspath(args.bench_dir)
    if not os.path.isfile(os.path.join(bench, "peers.py")):
        raise UsageError(f"--bench_dir {args.bench_dir}: no peers.py there; point it at ../shared/bench")
    if not os.path.isfile(args.bench_python):
        raise UsageError(f"--bench_python {args.bench_python}: not found; make the bench's environment with "
                         f"bash {os.path.join(bench, 'setup.sh')}, or pass its python")
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: give 1 or more runs")
    fast_bf16 = cpu_has_fast_bf16()
    precisions = args.precisions or (["fp32", "bf16"] if fast_bf16 else ["fp32"])
    if args.precisions is None and "bf16" not in precisions:
        print("this CPU has no bf16 hardware (AMX or AVX-512 BF16): timing fp32 only (--precisions fp32 bf16 "
              "adds the emulated bf16 rows)")
    runs = []
    for run in range(args.repeats):
        if args.repeats > 1:
            print(f"\nrun {run + 1} of {args.repeats}")
        runs.append(one_peers_run(args, bench, precisions, fast_bf16))
        result = runs[0] if args.repeats == 1 else dict(repeats=args.repeats, runs=runs, median=median_over_runs(runs))
        if args.json:  # after every run, so a stopped series keeps what it measured
            write_json(args.json, result)
    if args.repeats > 1:
        print_median_table(result["median"], len(runs), runs[0]["meta"]["batch"])
    if args.json:
        print(f"results: {args.json}")
    return result


def one_peers_run(args, bench, precisions, fast_bf16):
    """One run of peers.py (every model in its own process, one after another), this CPU's peak in each
    precision right after it (the machine's speed drifts), and the table of that run."""
    contender_file = os.path.join(ROOT, "tools", "peer_contender.py")
    peers, contenders = [], []
    for size in args.sizes:
        peers += PEERS[size]
        contenders += [f"{contender_file}:{fn}={label}" for fn, label in CONTENDERS[size]
                       if label.rsplit("-", 1)[1] in precisions]
    results_dir = tempfile.mkdtemp(prefix="vs_peers_")
    command = [args.bench_python, "peers.py", "--only", "^(" + "|".join(peers) + "|ours.*)$", "--channels",
               str(args.channels), "--threads", str(args.threads), "--alloc", args.alloc, "--batch",
               str(args.batch_size), "--md", "", "--results-dir", results_dir]
    for contender in contenders:
        command += ["--contender", contender]
    print("running:", " ".join(command), f"(in {bench}; each model takes about a minute)", flush=True)
    done = subprocess.run(command, cwd=bench, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not any(r.get("kind") == "peer" for r in rows):
        raise UsageError(f"peers.py failed (exit code {done.returncode}); its messages are above")
    meta = next(r for r in rows if r.get("kind") == "meta")
    fp32_bench_peak = next((r["peak_gflops"] for r in rows if r.get("kind") == "machine_peak"), None)
    peaks = {name: machine_peak(dtype, args.threads) for name, dtype in (("fp32", torch.float32),
                                                                          ("bf16", torch.bfloat16)) if name in precisions}
    models = [r for r in rows if r.get("kind") == "peer"]
    failed = [r for r in rows if r.get("kind") == "error"]  # e.g. a model past the bench's time limit
    result = dict(meta=meta, peers_peak_fp32=fp32_bench_peak, bf16_hardware=fast_bf16,
                  peaks={k: dict(best=v[0], **v[1]) for k, v in peaks.items()}, models=models, failed=failed)
    for r in failed:
        message = ((r.get("error") or "").strip().splitlines() or ["no message"])[-1]
        print(f"{r['name']}: failed in peers.py, left out of the table: {message}")
    print(f"\n{meta['cpu']}, {args.threads} threads, torch {meta['versions'].get('torch')}, allocator "
          f"{meta['alloc']}, batch {meta['batch']}, {meta['res']}x{meta['res']}x{args.channels}; peak GFLOP/s: "
          + ", ".join(f"{name} {best:.0f}" for name, (best, _) in peaks.items())
          + f" (the bench's own fp32: {fp32_bench_peak or float('nan'):.0f}); "
          f"{'AMX or AVX-512 BF16' if fast_bf16 else 'no bf16 hardware'}\n")
    print("| model | size | precision | params | train img/s | vs fastest peer | train GFLOP/s | % of peak | "
          f"sampling batch evals/s (batch {meta['batch']}) | vs fastest peer | peak RSS in training |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    shown = []  # the models in the table's order: by size, peers first
    for size in args.sizes:
        mine = [r for r in models if r["name"].startswith("ours") and ("medium" in r["name"]) == (size == "medium")]
        theirs = [r for r in models if r["name"] in PEERS[size]]
        # Ratios only against every peer of the size: with one failed, "the fastest" would be the other.
        complete = {r["name"] for r in theirs} == set(PEERS[size])
        best_train = max((r["train_img_s"] for r in theirs), default=float("nan")) if complete else float("nan")
        best_sample = max((r["sample_evals_s"] for r in theirs), default=float("nan")) if complete else float("nan")
        for r in theirs + mine:
            precision = "bf16" if r["name"].endswith("bf16") else "fp32"
            r.update(precision=precision, size=size, train_vs_best_peer=r["train_img_s"] / best_train,
                     sample_vs_best_peer=r["sample_evals_s"] / best_sample,
                     fraction_of_peak=r["train_gflops_3x"] / peaks[precision][0])
            print(f"| {r['name']} | {size} | {precision} | {r['params'] / 1e6:.2f} M | {r['train_img_s']:.1f} | "
                  f"{r['train_vs_best_peer']:.2f}x | {r['train_gflops_3x']:.0f} | {100 * r['fraction_of_peak']:.0f}% | "
                  f"{r['sample_evals_s']:.2f} | {r['sample_vs_best_peer']:.2f}x | {r['peak_rss_train_mb'] / 1024:.1f} GiB |")
            shown.append(r)
    result["models"] = shown
    return result


# What --repeats summarises for each model: the median across runs, and the range (lowest, highest).
MEDIAN_KEYS = ("train_img_s", "train_vs_best_peer", "fraction_of_peak", "sample_evals_s", "sample_vs_best_peer",
               "peak_rss_train_mb")


def median_over_runs(runs):
    """Each model's median and range of MEDIAN_KEYS over the runs it appears in. Ratios to the fastest peer
    are taken within each run first (peers and ours timed minutes apart on the same machine), then their
    median: a ratio of medians would mix runs made at different speeds of the machine. A run whose ratio
    is NaN (a peer of that size failed in it) is left out of that ratio's median; ratio_runs counts the rest."""
    by_name = {}
    for run in runs:
        for r in run["models"]:
            by_name.setdefault(r["name"], []).append(r)
    summary = []
    for name, rows in by_name.items():
        entry = dict(name=name, size=rows[0]["size"], precision=rows[0]["precision"], params=rows[0]["params"],
                     runs=len(rows))
        for key in MEDIAN_KEYS:
            values = sorted(r[key] for r in rows if r[key] == r[key])  # x != x only for NaN
            if not values:
                entry[key], entry[key + "_range"] = float("nan"), [float("nan"), float("nan")]
                continue
            middle = len(values) // 2
            entry[key] = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
            entry[key + "_range"] = [values[0], values[-1]]
        entry["ratio_runs"] = sum(r["train_vs_best_peer"] == r["train_vs_best_peer"] for r in rows)
        summary.append(entry)
    return summary


def print_median_table(summary, n, batch):
    """The --repeats table: each model's median over the n runs, with the lowest and highest ratio. A model
    whose numbers come from fewer runs (it failed in some, or a peer did) says from how many."""
    print(f"\nmedian of {n} runs (lowest-highest):\n")
    print("| model | size | precision | params | train img/s | vs fastest peer | % of peak | sampling batch evals/s "
          f"(batch {batch}) | vs fastest peer | peak RSS in training |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        spread = (lambda key: f"{r[key]:.2f}x ({r[key + '_range'][0]:.2f}-{r[key + '_range'][1]:.2f})")
        fewer = [f"{r['runs']} runs"] if r["runs"] < n else []
        fewer += [f"ratios from {r['ratio_runs']}"] if r["ratio_runs"] < r["runs"] else []
        name = r["name"] + (f" ({', '.join(fewer)})" if fewer else "")
        print(f"| {name} | {r['size']} | {r['precision']} | {r['params'] / 1e6:.2f} M | {r['train_img_s']:.1f} | "
              f"{spread('train_vs_best_peer')} | {100 * r['fraction_of_peak']:.0f}% | {r['sample_evals_s']:.2f} | "
              f"{spread('sample_vs_best_peer')} | {r['peak_rss_train_mb'] / 1024:.1f} GiB |")


def vs_lucidrains(args):
    """Our network and lucidrains' Unet, each in each of --settings, each run in its own process (a fresh
    compile cache and peak-memory count), then one table. Made for a GPU; runs anywhere."""
    if args.ckpt or args.num_classes:
        raise UsageError("--vs-lucidrains: compares unconditioned networks built from the flags; "
                         "drop --ckpt and --num_classes")
    ours = ["--base_channels", str(args.base_channels), "--channel_mults", *map(str, args.channel_mults),
            "--num_res_blocks", str(args.num_res_blocks)]
    if args.attention_resolutions is not None:
        ours += ["--attention_resolutions", *map(str, args.attention_resolutions)]
    if args.dropout is not None:
        ours += ["--dropout", str(args.dropout)]
    theirs = ["--network", "lucidrains", "--base_channels", str(args.lucid_dim), "--channel_mults",
              *map(str, args.lucid_mults)]
    common = ["--image_size", str(args.image_size), "--channels", str(args.channels), "--batch_size",
              str(args.batch_size), "--train_steps", str(args.train_steps), "--timesteps", str(args.timesteps),
              "--device", args.device, "--samplers", *args.samplers, "--steps", *map(str, args.steps)]
    rows, work = [], tempfile.mkdtemp(prefix="vs_lucidrains_")
    print("| network | params | setting | train img/s | vs lucidrains | train TFLOP/s | % of peak | peak memory "
          "| sampling evals/s | vs lucidrains |" + "".join(f" {s} {n} img/s |" for s in args.samplers
                                                           for n in args.steps), flush=True)
    for setting in args.settings:
        precision, *switches = setting.split("-")
        flags = ["--amp", "bf16", "--sample_amp"] if precision == "bf16" else ["--amp", "off"]
        flags += ["--compile"] * ("compile" in switches) + ["--cudnn_benchmark"] * ("cudnn" in switches)
        for name, network_flags in (("lucidrains", theirs), ("ours", ours)):
            out = os.path.join(work, f"{name}_{setting}.json")
            command = [sys.executable, os.path.abspath(__file__), *network_flags, *common, *flags, "--json", out]
            started = time.perf_counter()
            try:
                done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      timeout=args.run_timeout)
                last_line = (done.stdout.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
                failed = done.returncode != 0 and last_line  # e.g. "error: ... pip install ..."
            except subprocess.TimeoutExpired:
                failed = f"over --run_timeout {args.run_timeout:.0f} s"
            if failed:
                print(f"| {name} | | {setting} | failed: {failed} |", flush=True)
                continue
            with open(out) as f:
                r = json.load(f)
            r.update(network=name, setting=setting, wall_seconds=time.perf_counter() - started)
            rows.append(r)
            peer = next((p for p in rows if p["network"] == "lucidrains" and p["setting"] == setting), None)
            vs = (lambda key: f"{r[key] / peer[key]:.2f}x" if peer else "")
            peak = r.get("device_peak_gflop_per_s")
            of_peak = f"{100 * r['achieved_train_gflop_per_s'] / peak:.0f}%" if peak else ""
            print(f"| {name} | {r['parameters'] / 1e6:.1f} M | {setting} | {r['train_images_per_s']:.0f} | "
                  f"{vs('train_images_per_s')} | {r['achieved_train_gflop_per_s'] / 1e3:.1f} | {of_peak} | "
                  f"{r['train_peak_memory_mb']:.0f} MiB | {r['sampling_evals_per_s']:.0f} | "
                  f"{vs('sampling_evals_per_s')} |" + "".join(f" {x['images_per_s']:.1f} |" for x in r["sampling"]),
                  flush=True)
            if args.json:
                write_json(args.json, dict(rows=rows))
    return rows


def cuda_peak(device, dtype, size=8192, reps=10):
    """This GPU's achievable GFLOP/s in dtype: the best of reps size^3 matrix products. For fp32 the
    products run in TF32 while cuDNN is allowed TF32 (torch's default for convolutions, which are nearly
    all of a UNet's work): without it the fp32 matmul peak (about 52 TFLOP/s on an H100) is below what
    the TF32 convolutions reach, and a fraction of it would top 100%."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    try:
        a @ b
        best = float("inf")
        for _ in range(reps):
            synchronize(device)
            started = time.perf_counter()
            a @ b
            synchronize(device)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    return 2 * size ** 3 / best / 1e9


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LucidrainsUnet(torch.nn.Module):
    """lucidrains/denoising-diffusion-pytorch's Unet called the way our samplers and Algorithm 1 call a
    network, model(x, t, y) -> [B x C x H x W]: it takes (x, time) and has no class labels. Its layout
    is its own: two residual blocks per level, linear attention at every level but the lowest, full
    attention there, no dropout by default."""

    def __init__(self, dim, dim_mults, channels):
        super().__init__()
        try:
            from denoising_diffusion_pytorch import Unet
        except ImportError:
            raise UsageError("--network lucidrains: denoising_diffusion_pytorch is not installed; "
                             "pip install denoising-diffusion-pytorch (it is not in requirements.txt)") from None
        self.unet = Unet(dim=dim, dim_mults=tuple(dim_mults), channels=channels)

    def forward(self, x, t, y=None):
        return self.unet(x, t)


def build_network(config):
    if config.get("network") == "lucidrains":
        return LucidrainsUnet(config["dim"], config["dim_mults"], config["in_channels"])
    return build_model(config)


def network(args):
    """(model config, diffusion) from --ckpt or from the flags."""
    if args.network == "lucidrains":
        if args.ckpt or args.num_classes:
            raise UsageError("--network lucidrains: builds lucidrains' unconditioned Unet from --base_channels and "
                             "--channel_mults; drop --ckpt and --num_classes")
        return dict(network="lucidrains", dim=args.base_channels, dim_mults=list(args.channel_mults),
                    image_size=args.image_size, in_channels=args.channels, num_classes=0), \
            GaussianDiffusion(args.timesteps)
    if args.ckpt:
        state = load_checkpoint(args.ckpt, required=("model_config", "diffusion_config"))
        if state.get("task", "diffusion") != "diffusion" or state["model_config"].get("cond_channels"):
            raise UsageError(f"--ckpt {args.ckpt}: only unconditioned or class-conditional diffusion models "
                             "are benchmarked so far")
        return state["model_config"], GaussianDiffusion(**state["diffusion_config"])
    check_network_settings(args.image_size, args.channel_mults, args.attention_resolutions)
    config = resolve_model_config(image_size=args.image_size, in_channels=args.channels, out_channels=args.channels,
                                  base_channels=args.base_channels, channel_mults=args.channel_mults,
                                  num_res_blocks=args.num_res_blocks, num_classes=args.num_classes, dropout=args.dropout,
                                  attention_resolutions=args.attention_resolutions)
    return config, GaussianDiffusion(args.timesteps)


def print_profile(step, device, steps=5, rows=12):
    """Run step() `steps` times under torch.profiler and print the operators that took the most time
    (self time: excluding the operators each one calls), with each one's share of the total."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                                    row_limit=rows))


def main(argv=None):
    args = parse_args(argv)
    if args.vs_peers:
        return vs_peers(args)
    check_args(args)
    if args.vs_lucidrains:
        return vs_lucidrains(args)
    if args.malloc == "keep":
        keep_freed_memory()
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    config, diffusion = network(args)
    too_many = [steps for steps in args.steps if not 1 <= steps <= diffusion.timesteps] if args.samplers else []
    if too_many:  # respace would run all T steps and the row would name another count
        raise UsageError(f"--steps {too_many[0]}: must be between 1 and the model's T = {diffusion.timesteps}")
    diffusion = diffusion.to(device)
    model = build_network(config).to(device)
    args.amp = resolve_amp(args.amp, device)  # auto: as train.py --amp decides it
    args.channels_last = resolve_channels_last(args.channels_last, device, args.amp)  # auto: as train.py does
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    c, s, b = config["in_channels"], config["image_size"], args.batch_size
    labels = (lambda n: torch.randint(0, config["num_classes"], (n,), device=device)) if config.get("num_classes") \
        else (lambda n: None)
    x0 = (torch.rand(b, c, s, s, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    print(f"{count_parameters(model) / 1e6:.2f} M parameters, {s}x{s}x{c}, batch {b}, device {device}")

    # FLOPs per image: one forward, and one training step's forward and backward (Algorithm 1's loss).
    one = x0[:1]
    t_one = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        forward_flops = count_flops(lambda: model(one, t_one, labels(1)))
    train_flops = count_flops(lambda: diffusion.training_loss(model, one, labels(1))[0].mean().backward())
    model.zero_grad(set_to_none=True)

    # Training: Algorithm 1 + AdamW (foreach, as train.py runs it on a CPU), timed after two warm-up steps.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    train_model = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.float16 if args.amp == "fp16" else torch.bfloat16,
                              enabled=args.amp != "off")
    model.train()
    reset_peak_memory(device)

    def train_step():
        with autocast:
            loss = diffusion.training_loss(train_model, x0, labels(b))[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup_started = time.perf_counter()
    for i in range(2 + args.train_steps):
        if i == 2:
            synchronize(device)
            started = time.perf_counter()
            warmup_seconds = started - warmup_started  # with --compile, mostly compiling
        train_step()
    synchronize(device)
    train_images_per_s = b * args.train_steps / (time.perf_counter() - started)
    train_peak = peak_memory_mb(device)
    if args.profile:
        print_profile(train_step, device)

    # Sampling: network evaluations per second at this batch, then each sampler at each step count.
    model.eval()
    if args.sample_amp and args.amp != "off":  # as sample.py --amp: the network in autocast, the sampler in fp32
        model = AutocastNetwork(model, torch.float16 if args.amp == "fp16" else torch.bfloat16)
    t_batch = torch.full((b,), diffusion.timesteps - 1, dtype=torch.long, device=device)
    with torch.no_grad():
        model(x0, t_batch, labels(b))  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for _ in range(5):
            model(x0, t_batch, labels(b))
        synchronize(device)
    evals_per_s = 5 / (time.perf_counter() - started)
    sampling = []
    for sampler in args.samplers:
        for steps in args.steps:
            synchronize(device)
            started = time.perf_counter()
            if sampler == "ddim":
                ddim_sample(diffusion, model, x0.shape, steps=steps, y=labels(b), progress=False)
            else:
                respaced = respace(diffusion, steps) if steps < diffusion.timesteps else diffusion
                respaced.sample(model, x0.shape, labels(b), progress=False)
            synchronize(device)
            seconds = time.perf_counter() - started
            sampling.append(dict(sampler=sampler, steps=steps, images_per_s=b / seconds, seconds_per_batch=seconds))

    result = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
                  "cpu", threads=torch.get_num_threads(), model_config=config,
                  parameters=count_parameters(model), batch_size=b, amp=args.amp, malloc=args.malloc,
                  channels_last=args.channels_last, compile=args.compile, cudnn_benchmark=args.cudnn_benchmark,
                  sample_amp=args.sample_amp and args.amp != "off",
                  forward_gflops_per_image=forward_flops / 1e9, train_gflops_per_image=train_flops / 1e9,
                  train_images_per_s=train_images_per_s, achieved_train_gflop_per_s=train_flops / 1e9 * train_images_per_s,
                  train_peak_memory_mb=train_peak, warmup_seconds=warmup_seconds, sampling_evals_per_s=evals_per_s * b,
                  sampling_batches_per_s=evals_per_s, sampling=sampling)
    if device.type == "cuda":  # against what this GPU can do in the training precision
        result["device_peak_gflop_per_s"] = cuda_peak(device, torch.float32 if args.amp == "off" else
                                                      torch.bfloat16 if args.amp == "bf16" else torch.float16)
    print(f"| forward GFLOPs / image | {result['forward_gflops_per_image']:.3f} |")
    print(f"| training GFLOPs / image | {result['train_gflops_per_image']:.3f} |")
    print(f"| training images/s | {train_images_per_s:.1f} |")
    print(f"| achieved training GFLOP/s | {result['achieved_train_gflop_per_s']:.0f} |")
    print(f"| peak memory in training (MiB) | {train_peak:.0f} |")
    print(f"| sampling network evaluations/s (images x steps, batch {b}) | {evals_per_s * b:.0f} |")
    for row in sampling:
        print(f"| {row['sampler']} {row['steps']} steps: images/s | {row['images_per_s']:.2f} |")
    if args.json:
        write_json(args.json, result)
        print(f"results: {args.json}")
    return result


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
