"""
Which training choices matter? Train several small configurations one after another for the same
budget of optimizer steps, and score each with the offline classifier of tools/classifier.py:
the Frechet distance of its features to held-out real images (FD, lower is better) and, for
class-conditional data, the fraction of samples classified as the class asked for.

The choices swept are the ones a reader of ddpm.py meets first:
    --timesteps  T, the number of diffusion steps (DDPM Sec. 4 used 1000)
    --schedules  linear (DDPM Sec. 4) or cosine (Improved DDPM eq. 17)
    --losses     l2 = L_simple (DDPM eq. 14); l1; huber; vlb_l2 = the squared error weighted per t as
                 in the variational bound (DDPM eq. 12), with the weights clipped (ddpm.py)
    --predictions   what the network predicts: eps (DDPM eq. 14), x0, or v (Salimans & Ho 2022)
    --min_snr_gammas  Min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off, the paper uses 5

    python tools/training_sweep.py --dataset_path mnist.npz --classifier checkpoints/mnist_eval_classifier.pt \\
        --reference_path data/mnist_test --timesteps 1000 250 --schedules linear cosine \\
        --losses l2 l1 huber vlb_l2 --max_steps 2000 --out_dir runs/mnist_sweep \\
        -- --base_channels 16 --num_res_blocks 1 --dropout 0

By default one choice changes at a time: the first value of each list is the baseline, and every
other value is tried with the rest at baseline (the command above trains 1 + 1 + 1 + 3 = 6 models);
--grid full trains every combination, leaving out those train.py refuses (vlb_l2 weighs a predicted
eps, so it goes with eps and no Min-SNR only). Everything after "--" goes to every train.py run unchanged.
Each run is train.py itself (a separate process, its log in <out_dir>/logs/), so a sweep trains
exactly what the same command line would. Every run uses the same seed, so the same initial
weights (where the shapes agree), data order and noise draws. Sampling: --num_samples images from
the EMA weights, the same starting noise for every run, DDPM respaced to --sample_steps (Improved
DDPM eq. 19; the same number of network calls whatever T is).

Interrupt it and run the same command again: finished runs are not trained again, a run cut short
resumes from its checkpoint (train.py --resume), and every finished run is scored again (quick, and
deterministic). A run found in --out_dir is picked up only when it was trained with this command's
--dataset_path, --seed and flags after "--", for no more than --max_steps (a larger --max_steps resumes
it); otherwise a one-line error asks for a fresh --out_dir. Written to --out_dir: results.csv (one row
per run, plus "real": --num_samples held-out images, in the samples' class proportions, scored the same
way: the floor FD can reach with that many images), results.png (FD and class accuracy per run, and 16
samples of each), checkpoints/, samples/ and logs/ (each run's log, and the settings it was started with).
"""
import argparse
import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from classifier import features_and_logits, feature_statistics, load_classifier, load_folder  # noqa: E402
from ddpm import PREDICTIONS, SCHEDULES, SIMPLE_LOSSES, GaussianDiffusion  # noqa: E402
from model import build_model  # noqa: E402
from sampler_sweep import (check_classifier_fits, check_reference_classes, draw_samples, score_images,  # noqa: E402
                           split_floor_and_reference)
from utils import (UsageError, check_output_folder, load_checkpoint, load_weights, make_grid_image,  # noqa: E402
                   pick_device, prepare_network)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ["run", "timesteps", "schedule", "loss", "prediction", "min_snr_gamma", "max_steps", "final_loss",
          "train_seconds", "num_samples", "sampler", "sample_steps", "fd", "class_accuracy", "sample_seconds", "device"]
# Flags the sweep sets on every train.py run itself; passing them after "--" would break the comparison.
OWN_FLAGS = ("--dataset_path", "--timesteps", "--schedule", "--loss", "--prediction", "--min_snr_gamma",
             "--max_steps", "--run_name", "--checkpoint_dir", "--sample_dir", "--resume", "--seed", "--device")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Train several configurations for one budget and score each.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                usage="%(prog)s --dataset_path D --classifier C --reference_path R [options] "
                                "[-- train.py flags for every run]")
    p.add_argument("--dataset_path", required=True, help="training data, as for train.py (folder or .npz)")
    p.add_argument("--classifier", required=True, help="checkpoint written by tools/classifier.py")
    p.add_argument("--reference_path", required=True, help="held-out real images (class subfolders)")
    p.add_argument("--num_reference", type=int, default=10000, help="reference images for the statistics (0 = all)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[1000], help="values of T; the first is the baseline")
    p.add_argument("--schedules", nargs="+", default=["linear"], choices=SCHEDULES)
    p.add_argument("--losses", nargs="+", default=["l2"], choices=SIMPLE_LOSSES)
    p.add_argument("--predictions", nargs="+", default=["eps"], choices=PREDICTIONS)
    p.add_argument("--min_snr_gammas", type=float, nargs="+", default=[0.0], help="0 = off")
    p.add_argument("--grid", default="one_at_a_time", choices=("one_at_a_time", "full"),
                   help="one_at_a_time: vary one choice from the baseline (the first values); full: all combinations")
    p.add_argument("--max_steps", type=int, default=2000, help="the budget: optimizer steps for every run")
    p.add_argument("--seed", type=int, default=0, help="the same seed for every run")
    p.add_argument("--num_samples", type=int, default=500, help="samples scored per run")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    p.add_argument("--sample_steps", type=int, default=100, help="network calls per sample (ddpm: respaced)")
    p.add_argument("--batch_size", type=int, default=250, help="samples per sampling batch")
    p.add_argument("--out_dir", default="runs/sweep", help="checkpoints, logs, results.csv and results.png")
    p.add_argument("--device", default="auto", help="for training and sampling")
    args = p.parse_args(argv)
    args.train_args = train_args
    return args


def refusal(config):
    """Why train.py would refuse this combination (GaussianDiffusion's own check, e.g. vlb_l2 weighs a
    predicted eps, DDPM eq. 12, so it takes neither another target nor Min-SNR), or None."""
    T, schedule, loss, prediction, gamma = config
    try:
        GaussianDiffusion(T, schedule, loss, prediction=prediction, min_snr_gamma=gamma)
    except UsageError as error:
        return str(error)
    return None


def configurations(args):
    """The (T, schedule, loss, prediction, min_snr_gamma) tuples to train, baseline first, without repeats
    or combinations train.py refuses."""
    lists = (args.timesteps, args.schedules, args.losses, args.predictions, args.min_snr_gammas)
    if args.grid == "full":
        configs = list(itertools.product(*lists))
    else:
        base = tuple(values[0] for values in lists)
        configs = [base] + [base[:i] + (value,) + base[i + 1:] for i, values in enumerate(lists)
                            for value in values[1:]]
    kept = []
    for config in dict.fromkeys(configs):
        reason = refusal(config)
        if reason:
            print(f"{run_name(*config)}: left out ({reason})")
        else:
            kept.append(config)
    return kept


def check_args(args):
    if args.max_steps < 1 or args.num_samples < 2 or args.batch_size < 1 or args.sample_steps < 1:
        raise UsageError("--max_steps, --batch_size and --sample_steps must be at least 1, --num_samples at least 2")
    if min(args.min_snr_gammas) < 0:
        raise UsageError(f"--min_snr_gammas {args.min_snr_gammas}: each must be >= 0 (0 = off)")
    if min(args.timesteps) < 2:
        raise UsageError(f"--timesteps {args.timesteps}: every T must be at least 2")
    if args.sample_steps > min(args.timesteps):
        raise UsageError(f"--sample_steps {args.sample_steps}: must be at most the smallest T ({min(args.timesteps)})")
    # train.py's argparse takes any unambiguous start of a flag's name (--max_step, --see), so a flag given
    # after "--" clashes when it is the start of one the sweep sets.
    typed = [flag.split("=")[0] for flag in args.train_args if flag.startswith("--") and flag != "--"]
    if "--dataset" in typed:  # a train.py flag of its own (a built-in dataset), which --dataset_path overrides
        raise UsageError("after '--': --dataset names a built-in dataset, but the sweep trains on its own "
                         "--dataset_path; export the dataset to a folder (tools/export_dataset.py) and pass that")
    clashing = [flag for flag in typed if any(own.startswith(flag) for own in OWN_FLAGS)]
    if clashing:
        raise UsageError(f"after '--': {', '.join(clashing)} is set by the sweep itself; use the sweep's own "
                         "--timesteps/--schedules/--losses/--predictions/--min_snr_gammas/--max_steps/--seed/--device")
    experts = [flag for flag in typed if any(own.startswith(flag) for own in ("--t_min", "--t_max"))]
    if experts:  # each run would be scored alone at every t, including the t it never learned
        raise UsageError(f"after '--': {experts[0]} trains an expert denoiser for part of the t range only, which "
                         "the sweep would score alone at every t; sweep models trained on every t")
    if not os.path.isdir(args.reference_path):  # now, not after the first run has trained
        raise UsageError(f"--reference_path {args.reference_path}: no such folder; point it at held-out real "
                         "images (class subfolders)")
    check_output_folder(args.out_dir, "--out_dir")


def run_name(T, schedule, loss, prediction="eps", min_snr_gamma=0.0):
    """T1000_linear_l2, with _v / _x0 and _minsnr5 added only when they differ from DDPM's eps and no
    weighting (so that runs of earlier sweeps keep their names)."""
    return (f"T{T}_{schedule}_{loss}" + ("" if prediction == "eps" else f"_{prediction}")
            + (f"_minsnr{min_snr_gamma:g}" if min_snr_gamma else ""))


def read_saved(path):
    """The checkpoint's contents, or None when there is no checkpoint (or it cannot be read)."""
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return state if isinstance(state, dict) else None


def saved_number(path, key="step"):
    """A number the checkpoint records: the step it was saved at, or train_seconds; None when there is no
    checkpoint (or it cannot be read)."""
    value = (read_saved(path) or {}).get(key)
    return None if value is None else (int(value) if key == "step" else float(value))


def check_same_run(args, name, checkpoint, record, settings):
    """A run already in --out_dir is picked up (skipped when finished, resumed when not) only if it is this
    sweep's run: the same data and seed (what its checkpoint's config records), the same train.py flags
    after "--" (what the sweep recorded in logs/<run>.json when it started the run) and no more steps than
    --max_steps. Otherwise a finished run would be scored as though trained with the new settings, and
    train.py --resume would keep the saved run's settings and ignore the new ones."""
    saved = read_saved(checkpoint) or {}
    config, step = saved.get("config") or {}, saved.get("step", 0)
    fresh = "; give a fresh --out_dir for these settings (or run with the earlier ones)"
    if step > args.max_steps:
        raise UsageError(f"run {name}: {checkpoint} was trained for {step} steps, more than --max_steps "
                         f"{args.max_steps}" + fresh)
    if config.get("dataset_path") and os.path.abspath(config["dataset_path"]) != settings["dataset_path"]:
        raise UsageError(f"run {name}: {checkpoint} was trained on --dataset_path {config['dataset_path']}, not "
                         f"{args.dataset_path}" + fresh)
    if "seed" in config and config["seed"] != args.seed:
        raise UsageError(f"run {name}: {checkpoint} was trained with --seed {config['seed']}, not {args.seed}" + fresh)
    if "train_args" in record and record["train_args"] != settings["train_args"]:
        raise UsageError(f"run {name}: {checkpoint} was trained with '-- {' '.join(record['train_args'])}', not "
                         f"'-- {' '.join(settings['train_args'])}'" + fresh)


def train(args, name, T, schedule, loss, prediction, min_snr_gamma):
    """Run train.py for one configuration (or resume it, or skip it when it is finished).
    Returns the seconds spent training: the checkpoint's train_seconds (train.py's clock of training steps,
    over every resumed part; sample grids, saving and start-up left out, which would favour small T),
    or, for a checkpoint without it, the wall time of every attempt (kept in logs/<run>.json)."""
    folders = {flag: os.path.join(args.out_dir, sub) for flag, sub in
               (("checkpoints", "checkpoints"), ("samples", "samples"), ("logs", "logs"))}
    os.makedirs(folders["logs"], exist_ok=True)
    record_path = os.path.join(folders["logs"], f"{name}.json")
    record = {"train_seconds": 0.0}
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
    checkpoint = os.path.join(folders["checkpoints"], f"{name}.pt")
    step = saved_number(checkpoint)
    # What this sweep asks of train.py besides the configuration and the budget; kept in the record, so
    # that a later call can tell whether the run it finds is its own (check_same_run).
    settings = dict(dataset_path=os.path.abspath(args.dataset_path), seed=args.seed, train_args=list(args.train_args))
    if step is not None:
        check_same_run(args, name, checkpoint, record, settings)
    if step is not None and step >= args.max_steps:
        print(f"{name}: already trained ({step} steps), not training again")
        return saved_number(checkpoint, "train_seconds") or record["train_seconds"]
    record.update(settings)  # written with the time below, whether or not train.py finishes
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset_path", settings["dataset_path"],
               "--timesteps", str(T), "--schedule", schedule, "--loss", loss, "--prediction", prediction,
               "--min_snr_gamma", f"{min_snr_gamma:g}", "--max_steps", str(args.max_steps),
               "--seed", str(args.seed), "--device", args.device, "--run_name", name,
               "--checkpoint_dir", folders["checkpoints"], "--sample_dir", folders["samples"]]
    command += ["--resume"] if step is not None else []
    command += args.train_args
    log_path = os.path.join(folders["logs"], f"{name}.log")
    print(f"{name}: training for {args.max_steps} steps" + (f" (resuming at step {step})" if step else "")
          + f"; log: {log_path}", flush=True)
    started = time.perf_counter()
    # A SIGTERM to the sweep alone (`kill`, `timeout`) would end it at once and leave train.py training
    # with no one waiting for it; while train.py runs, it stops the sweep through the branch below instead.
    handles_sigterm = threading.current_thread() is threading.main_thread()  # where Python runs handlers
    previous_handler = signal.signal(signal.SIGTERM, stop_sweep) if handles_sigterm else None
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached train.py too: let it write its checkpoint before this sweep stops
            # (subprocess.run would kill it after a quarter of a second).
            process.wait()
            raise
        except BaseException:
            # Anything else that stops the sweep here (SIGTERM, a time limit's signal) did not reach
            # train.py: ask it to save and stop (SIGTERM, which it takes as Ctrl-C) rather than leave it
            # training on its own; kill it only if it has not stopped within a minute.
            stop_and_wait(process, seconds=60)
            raise
        finally:
            if handles_sigterm:  # None: a handler set outside Python, which we cannot put back; the default
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)
            record["train_seconds"] += time.perf_counter() - started
            with open(record_path, "w") as f:
                json.dump(record, f)
    if returncode != 0:
        with open(log_path) as f:
            last = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
        reason = last[-1] if last else f"exit status {returncode}"
        raise UsageError(f"run {name}: train.py stopped: {reason} (whole log: {log_path})")
    return saved_number(checkpoint, "train_seconds") or record["train_seconds"]


def stop_sweep(signum, frame):
    """SIGTERM while train.py runs: stop the sweep as an exception, so train() can stop train.py first."""
    raise SystemExit("terminated: run the same command again to continue (finished runs are kept; train.py "
                     "saved the run it was in)")


def stop_and_wait(process, seconds):
    """SIGTERM, then SIGKILL if the process is still running after `seconds`; returns its exit code."""
    process.terminate()
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def final_loss(args, name):
    """The mean logged loss over the last 100 steps of the run (its loss.csv), for the table."""
    path = os.path.join(args.out_dir, "samples", name, "loss.csv")
    if not os.path.isfile(path):
        return float("nan")
    with open(path) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    return sum(losses[-100:]) / max(1, len(losses[-100:]))


def write_results(path, rows):
    """Rewrite the whole table (a sweep run again replaces its rows, rather than appending twice)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot(rows, grids, png_path):
    """FD and class accuracy per run (the real-image floor as a line), and 16 samples of each run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in rows if r["run"] != "real"]
    real = next((r for r in rows if r["run"] == "real"), None)
    columns = min(len(runs), 4)
    grid_rows = -(-len(runs) // columns)
    fig = plt.figure(figsize=(3 * columns + 1, 3.2 + 2.6 * grid_rows))
    layout = fig.add_gridspec(1 + grid_rows, 2 * columns, height_ratios=[1.3] + [1] * grid_rows)
    names = [r["run"] for r in runs]
    for i, (key, label) in enumerate((("fd", "FD (classifier features), lower is better"),
                                      ("class_accuracy", "class accuracy, higher is better"))):
        ax = fig.add_subplot(layout[0, i * columns:(i + 1) * columns])
        values = [float(r[key]) for r in runs]
        ax.barh(names[::-1], values[::-1], color="tab:blue")
        if real is not None and real[key] not in ("", "nan"):
            ax.axvline(float(real[key]), color="black", linestyle="--", linewidth=1,
                       label=f"{real['num_samples']} real images")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for i, r in enumerate(runs):
        ax = fig.add_subplot(layout[1 + i // columns, 2 * (i % columns):2 * (i % columns) + 2])
        ax.imshow(grids[r["run"]], cmap="gray" if grids[r["run"]].mode == "L" else None)
        ax.set_title(f"{r['run']}\nFD {float(r['fd']):.1f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def markdown_table(rows):
    lines = ["| run | T | schedule | loss | prediction | Min-SNR | final loss | train time | FD | class accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["run"] == "real":
            lines.append(f"| {r['num_samples']} real held-out images (the floor) |" + " |" * 7
                         + f" {float(r['fd']):.1f} | {float(r['class_accuracy']):.1%} |")
            continue
        accuracy = float(r["class_accuracy"])
        gamma = float(r["min_snr_gamma"])
        lines.append(f"| {r['run']} | {r['timesteps']} | {r['schedule']} | {r['loss']} | {r['prediction']} | "
                     f"{f'{gamma:g}' if gamma else 'off'} | {float(r['final_loss']):.4f} | "
                     f"{float(r['train_seconds']) / 60:.1f} min | {float(r['fd']):.1f} | "
                     + ("" if accuracy != accuracy else f"{accuracy:.1%}") + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    configs = configurations(args)
    print(f"{len(configs)} run{'' if len(configs) == 1 else 's'} of {args.max_steps} steps: "
          f"{', '.join(run_name(*c) for c in configs)}")
    classifier, classifier_state = load_classifier(args.classifier)
    classifier = classifier.to(device)
    # The held-out images, read now rather than after the first run has trained: at the classifier's size,
    # which every model must have too (check_classifier_fits below).
    size, channels = classifier_state["config"]["image_size"], classifier_state["config"]["channels"]
    limit = args.num_reference + args.num_samples if args.num_reference else 0
    real, real_labels, real_classes = load_folder(args.reference_path, size, channels, limit, seed=args.seed,
                                                  flag="--reference_path")
    if len(real) < 2 * args.num_samples:
        raise UsageError(f"--reference_path {args.reference_path}: {len(real)} images; need at least "
                         f"twice --num_samples ({2 * args.num_samples})")

    rows, grids, reference, noise = [], {}, None, None
    for T, schedule, loss, prediction, gamma in configs:
        name = run_name(T, schedule, loss, prediction, gamma)
        seconds = train(args, name, T, schedule, loss, prediction, gamma)
        ckpt = os.path.join(args.out_dir, "checkpoints", f"{name}_ema.pt")
        state = load_checkpoint(ckpt, required=("model_config", "diffusion_config", "ema"))
        config, class_names = state["model_config"], state.get("class_names") or []
        check_classifier_fits(classifier_state, config, class_names, f"--classifier {args.classifier}")
        size, channels = config["image_size"], config["in_channels"]
        labels = torch.arange(args.num_samples) % len(class_names) if class_names else None
        if reference is None:  # once, with the first model's classes: the floor row and the statistics
            check_reference_classes(real_classes, class_names, f"--reference_path {args.reference_path}")
            # The floor has the samples' class proportions (sampler_sweep.split_floor_and_reference).
            floor, rest = split_floor_and_reference(real_labels, args.num_samples, labels,
                                                    f"--reference_path {args.reference_path}")
            reference = feature_statistics(features_and_logits(classifier, real[rest], device=device)[0])
            fd, accuracy = score_images(classifier, real[floor], real_labels[floor] if class_names else None,
                                        *reference, device)
            rows.append(dict(run="real", num_samples=args.num_samples, fd=f"{fd:.3f}", class_accuracy=f"{accuracy:.4f}",
                             device=str(device)))
            print(f"real: {args.num_samples} held-out images score FD {fd:.2f}, class accuracy {accuracy:.3f}")
            noise = torch.randn(args.num_samples, channels, size, size,
                                generator=torch.Generator().manual_seed(args.seed))
        model = build_model(config)
        load_weights(model, state["ema"], ckpt)
        model = prepare_network(model, device)  # as sample.py runs it (fp32: the layout)
        diffusion = GaussianDiffusion(**state["diffusion_config"]).to(device)
        images, sample_seconds = draw_samples(diffusion, model, args.sampler, args.sample_steps, noise, labels,
                                              args.batch_size, args.seed)
        fd, accuracy = score_images(classifier, images, labels, *reference, device)
        grids[name] = make_grid_image(images[:16], nrow=4)
        grids[name].save(os.path.join(args.out_dir, "samples", name, "sweep_samples.png"))
        rows.append(dict(run=name, timesteps=T, schedule=schedule, loss=loss, prediction=prediction,
                         min_snr_gamma=f"{gamma:g}", max_steps=args.max_steps,
                         final_loss=f"{final_loss(args, name):.5f}", train_seconds=f"{seconds:.1f}",
                         num_samples=args.num_samples, sampler=args.sampler, sample_steps=args.sample_steps,
                         fd=f"{fd:.3f}", class_accuracy=f"{accuracy:.4f}", sample_seconds=f"{sample_seconds:.1f}",
                         device=str(device)))
        print(f"{name}: FD {fd:.2f}, class accuracy {accuracy:.3f} ({args.num_samples} samples, "
              f"{sample_seconds:.0f} s); trained in {seconds / 60:.1f} min", flush=True)
        write_results(os.path.join(args.out_dir, "results.csv"), rows)

    plot(rows, grids, os.path.join(args.out_dir, "results.png"))
    print()
    print(markdown_table(rows))
    print(f"\ntable: {os.path.join(args.out_dir, 'results.csv')}; plot: {os.path.join(args.out_dir, 'results.png')}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: run the same command again to continue (finished runs are kept; train.py "
                 "saved the run it was in)")
