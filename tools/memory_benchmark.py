"""
What each of train.py's memory and speed switches buys: peak memory and images per second for the same
model and batch, with and without --grad_checkpointing, --channels_last, --amp bf16 (and --compile
when asked), each measured by running train.py itself for a few steps in a fresh process.

    python tools/memory_benchmark.py                                   # 64x64, base 64, batch 32
    python tools/memory_benchmark.py --image_size 96 --base_channels 128 --batch_size 64 --compile \
        --csv images/memory.csv

Peak memory is what train.py logs (loss.csv, peak_memory_mb): on CUDA the most GPU memory its tensors
held; on CPU the process's peak resident memory, which also counts Python, torch and the dataset
(the baseline row shows that floor plus the training's share, so compare differences between rows).
Speed is the mean images/s over the steps after the first (which pays for start-up and compiling).
Data: the offline built-in 'shapes' dataset, so nothing is downloaded and no folder is needed.
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from utils import UsageError, append_csv_rows, check_csv_table, pick_device  # noqa: E402

FIELDS = ["setting", "peak_memory_mb", "images_per_s", "image_size", "base_channels", "batch_size", "device",
          "seconds"]
# The layout is named in the fp32 rows: train.py's default (--channels_last auto) would pick NHWC for fp32
# on a CPU, and the baseline is the plain NCHW layout on every device. With bf16, auto keeps NCHW.
SETTINGS = [("baseline", ["--channels_last", "off"]),
            ("grad_checkpointing", ["--channels_last", "off", "--grad_checkpointing"]),
            ("channels_last", ["--channels_last", "on"]), ("bf16", ["--amp", "bf16"]),
            ("grad_checkpointing+bf16", ["--grad_checkpointing", "--amp", "bf16"])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Peak memory and speed of train.py's memory/speed switches.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--base_channels", type=int, default=64)
    p.add_argument("--channel_mults", type=int, nargs="+", default=[1, 2, 2, 2])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="training steps per setting (the first is not timed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="also time --compile (slow to start, on CPU minutes)")
    p.add_argument("--fp16", action="store_true", help="also time --amp fp16 (CUDA only)")
    p.add_argument("--settings", nargs="+", default=None, choices=[name for name, _ in SETTINGS],
                   help="only these of the settings (default: all)")
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--csv", default=None, help="append the rows to this CSV")
    return p.parse_args(argv)


def run_setting(args, flags, folder):
    """train.py for args.steps steps with these flags -> (peak MiB, images/s, device, seconds)."""
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "shapes", "--image_size",
               str(args.image_size), "--base_channels", str(args.base_channels), "--channel_mults",
               *map(str, args.channel_mults), "--num_res_blocks", str(args.num_res_blocks),
               "--batch_size", str(args.batch_size), "--max_steps", str(args.steps),
               "--save_every", str(10 ** 9), "--sample_every", "0", "--device", args.device,
               "--checkpoint_dir", os.path.join(folder, "checkpoints"), "--sample_dir", os.path.join(folder, "samples"),
               *flags]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=folder)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"error: train.py {' '.join(flags) or '(baseline)'} failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(folder, "samples", "shapes", "loss.csv")) as f:
        rows = list(csv.DictReader(f))
    timed = rows[1:] or rows
    device = next((line.split("device ")[1].split(",")[0] for line in result.stdout.splitlines()
                   if line.startswith("run shapes:")), args.device)
    return (float(rows[-1]["peak_memory_mb"]), sum(float(r["images_per_s"]) for r in timed) / len(timed),
            device, seconds)


def check_args(args):
    """One-line errors before the first setting is measured, not after the last, whose rows would be lost."""
    small = [f"--{name} {value}" for name, value in (("steps", args.steps), ("batch_size", args.batch_size),
                                                        ("image_size", args.image_size),
                                                        ("base_channels", args.base_channels)) if value < 1]
    if small:  # train.py would refuse them naming its own flags (--steps is its --max_steps)
        raise UsageError(f"{small[0]}: must be at least 1")
    device = pick_device(args.device)  # also a one-line error for a device this machine does not have
    if args.fp16 and device.type != "cuda":
        raise UsageError(f"--fp16: train.py's --amp fp16 runs on CUDA only, and this run's device is {device}; "
                         "drop --fp16")
    if args.csv:
        check_csv_table(args.csv, FIELDS)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    settings = [(name, flags) for name, flags in SETTINGS if args.settings is None or name in args.settings]
    settings += ([("compile", ["--channels_last", "off", "--compile"])] if args.compile else []) + (
        [("fp16", ["--amp", "fp16"])] if args.fp16 else [])
    rows = []
    print(f"{args.image_size}x{args.image_size}, base {args.base_channels}, mults {args.channel_mults}, "
          f"batch {args.batch_size}, {args.steps} steps per setting")
    print(f"{'setting':32s} {'peak MiB':>9s} {'images/s':>9s}")
    for name, flags in settings:
        with tempfile.TemporaryDirectory() as folder:
            peak, speed, device, seconds = run_setting(args, flags, folder)
        rows.append(dict(setting=name, peak_memory_mb=f"{peak:.0f}", images_per_s=f"{speed:.1f}",
                         image_size=args.image_size, base_channels=args.base_channels, batch_size=args.batch_size,
                         device=device, seconds=f"{seconds:.0f}"))
        print(f"{name:32s} {peak:9.0f} {speed:9.1f}   ({device}, {seconds:.0f} s)", flush=True)
    if args.csv:
        append_csv_rows(args.csv, FIELDS, rows)
        print(f"appended to {args.csv}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
