"""Nothing is lost: exact resume, kill -9 at any moment, rotation, non-finite losses, full disks,
and the memory and precision switches that must not change what is trained."""
import csv
import os
import random
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import train
import utils
from conftest import ROOT, TINY_TRAIN_FLAGS, assert_one_line_error, make_image_folder, run_script
from utils import UsageError

# Class labels with label dropout, flips, dropout, two micro-batches per step, a grid every 2 steps:
# every random stream and every piece of state a resume has to restore.
EXACT_FLAGS = [*TINY_TRAIN_FLAGS, "--accumulation_iters", "2", "--sample_every", "2", "--sample_steps", "2",
               "--swa_start", "2", "--max_steps", "7", "--save_every", "100", "--lr", "1e-3"]


def train_here(folder, *flags, expect_exit=None):
    """train.main in this process, in folder (tests chdir there), as `python train.py flags` would."""
    argv = [*map(str, flags)]
    if expect_exit is None:
        train.main(argv)
    else:
        with pytest.raises(SystemExit) as stopped:
            train.main(argv)
        assert stopped.value.code == expect_exit


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    """Bit for bit: every tensor in two nested checkpoint structures is equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("extra", [[], ["--loss", "hybrid", "--learn_sigma", "--timestep_sampler", "loss-aware"]],
                         ids=["l_simple", "hybrid_loss_aware"])
def test_stopping_and_resuming_gives_the_same_weights_as_one_uninterrupted_run(tmp_path, monkeypatch, extra):
    make_image_folder(tmp_path / "pets")
    for name in ("once", "twice"):
        (tmp_path / name).mkdir()
        os.symlink(tmp_path / "pets", tmp_path / name / "pets")

    monkeypatch.chdir(tmp_path / "once")
    train_here(".", "--dataset_path", "pets", *EXACT_FLAGS, *extra)

    # The same run, stopped by a Ctrl-C that arrives during step 3 (so it stops after step 3 or 4),
    # then resumed to the end. The stop saves on a step boundary; --resume restores data position,
    # random streams, optimizer, schedule, EMA and SWA.
    monkeypatch.chdir(tmp_path / "twice")
    real_update_ema = train.update_ema

    def ctrl_c_during_step_3(ema_model, model, decay, step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)
        real_update_ema(ema_model, model, decay, step)

    monkeypatch.setattr(train, "update_ema", ctrl_c_during_step_3)
    train_here(".", "--dataset_path", "pets", *EXACT_FLAGS, *extra, expect_exit=130)
    monkeypatch.setattr(train, "update_ema", real_update_ema)
    stopped_at = load("checkpoints/pets.pt")["step"]
    assert 3 <= stopped_at < 7
    train_here(".", "--dataset_path", "pets", "--resume")

    once, twice = load(tmp_path / "once/checkpoints/pets.pt"), load(tmp_path / "twice/checkpoints/pets.pt")
    assert once["step"] == twice["step"] == 7
    for key in ("model", "ema", "swa", "swa_count", "optimizer", "scheduler", "timestep_sampler", "rng"):
        assert_same_tensors(once[key], twice[key])
    # The log has each step once, and the same losses.
    with open(tmp_path / "once/samples/pets/loss.csv") as f1, open(tmp_path / "twice/samples/pets/loss.csv") as f2:
        rows1, rows2 = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [r["step"] for r in rows2] == [str(s) for s in range(1, 8)]
    assert [r["loss"] for r in rows1] == [r["loss"] for r in rows2]


def test_keep_last_rotates_numbered_checkpoints_and_swa_is_the_mean_of_the_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "5", "--save_every", "1",
               "--sample_every", "0", "--keep_last", "3", "--swa_start", "2", "--lr", "1e-3")
    names = sorted(os.listdir("checkpoints"))
    assert names == ["pets.pt", "pets_ema.pt", "pets_ema_step0000003.pt", "pets_ema_step0000004.pt",
                     "pets_ema_step0000005.pt", "pets_step0000003.pt", "pets_step0000004.pt", "pets_step0000005.pt"]
    assert os.path.samefile("checkpoints/pets.pt", "checkpoints/pets_step0000005.pt")  # the names: the newest
    assert os.path.samefile("checkpoints/pets_ema.pt", "checkpoints/pets_ema_step0000005.pt")

    # SWA averages the weights after steps 3, 4, 5 (those after --swa_start 2): their plain mean.
    raw = [load(f"checkpoints/pets_step000000{s}.pt")["model"] for s in (3, 4, 5)]
    final = load("checkpoints/pets_ema.pt")
    assert final["swa_count"] == 3
    for key, value in final["swa"].items():
        assert torch.allclose(value, sum(r[key] for r in raw) / 3, atol=1e-6), key
    assert not torch.equal(final["swa"]["output.2.weight"], final["ema"]["output.2.weight"])


def start_training(folder, *flags):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags)], cwd=folder, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_9_at_random_moments_loses_only_the_steps_since_the_last_save(tmp_path):
    """kill -9 gives no chance to save; every name must still hold a complete checkpoint, each time."""
    make_image_folder(tmp_path / "pets")
    flags = ["--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "1000", "--save_every", "1",
             "--sample_every", "0", "--keep_last", "2"]
    rng = random.Random(0)
    last_step = 0
    for round in range(3):
        process = start_training(tmp_path, *flags, *(["--resume"] if round else []))
        deadline = time.time() + 60
        while time.time() < deadline:  # until this process has saved a step of its own
            try:
                if load(tmp_path / "checkpoints/pets.pt")["step"] > last_step:
                    break
            except (FileNotFoundError, RuntimeError, EOFError):
                pass
            time.sleep(0.05)
        else:
            process.kill()
            raise AssertionError("no checkpoint appeared: " + process.stderr.read()[-2000:])
        time.sleep(rng.uniform(0.0, 0.4))  # mid-step or mid-write, wherever it falls
        process.kill()
        process.wait()
        full, ema = load(tmp_path / "checkpoints/pets.pt"), load(tmp_path / "checkpoints/pets_ema.pt")
        assert full["step"] > last_step and ema["step"] >= full["step"] - 1
        last_step = full["step"]
    end = last_step + 2  # --max_steps may change on resume (it steers the run)
    result = run_script("train.py", *flags, "--resume", "--max_steps", end, cwd=tmp_path)
    assert f"resuming at step {last_step}" in result.stdout
    assert load(tmp_path / "checkpoints/pets.pt")["step"] == end
    names = os.listdir(tmp_path / "checkpoints")
    assert not [n for n in names if ".tmp" in n]  # what the kills left half-written is gone
    assert sorted(names) == ["pets.pt", "pets_ema.pt", f"pets_ema_step{end - 1:07d}.pt", f"pets_ema_step{end:07d}.pt",
                             f"pets_step{end - 1:07d}.pt", f"pets_step{end:07d}.pt"]
    with open(tmp_path / "samples/pets/loss.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, end + 1))  # each step logged once


def test_non_finite_losses_skip_the_step_then_stop_the_run_without_saving(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    real = train.to_model_range
    calls = {"n": 0}

    def poisoned_on(bad_calls):
        def to_model_range(images):
            calls["n"] += 1
            x = real(images)
            return x * float("nan") if calls["n"] in bad_calls else x
        return to_model_range

    # Steps 2 and 3 see NaN images (as an fp16 overflow would): skipped, with a warning; training goes on.
    monkeypatch.setattr(train, "to_model_range", poisoned_on({2, 3}))
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "5", "--sample_every", "0")
    out = capsys.readouterr().out
    assert out.count("warning: step") == 2 and "step skipped, weights unchanged" in out
    state = load("checkpoints/pets.pt")
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["optimizer"]["state"][0]["step"].item() == 3  # AdamW stepped 3 times, not 5

    # Every step from the 7th on is NaN: the run stops after 5 in a row (at step 11), naming the t values.
    # Its checkpoints (every 5 steps) hold only finite weights: those of step 6, the last good update.
    calls["n"] = 0
    monkeypatch.setattr(train, "to_model_range", poisoned_on(set(range(7, 100))))
    with pytest.raises(UsageError, match=r"step 11: .*not finite .*t of the non-finite images here: \[\d+.*5 steps in a row"):
        train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "20", "--save_every", "5",
                   "--sample_every", "0", "--run_name", "diverging")
    state = load("checkpoints/diverging.pt")
    assert state["step"] == 10 and state["optimizer"]["state"][0]["step"].item() == 6
    assert all(torch.isfinite(v).all() for v in [*state["model"].values(), *state["ema"].values()])


def test_unwritable_checkpoint_folder_fails_at_start(tmp_path, image_folder):
    (tmp_path / "a_file").write_text("not a folder")
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS,
                        "--checkpoint_dir", "a_file/checkpoints", cwd=tmp_path, check=False)
    assert_one_line_error(result, "--checkpoint_dir a_file/checkpoints", "cannot write there")


def test_too_little_disk_space_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda path: type("usage", (), {"free": 10 * 2**20})())
    with pytest.raises(UsageError, match=r"--checkpoint_dir checkpoints: only 10 MB free.*need about \d+ MB"):
        train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--base_channels", "128")
    assert not os.path.exists("samples/pets/loss.csv")  # nothing started


def test_bf16_autocast_keeps_weights_ema_and_optimizer_state_in_fp32(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "2", "--sample_every", "0",
               "--amp", "bf16", "--swa_start", "0")
    state = load("checkpoints/pets.pt")
    tensors = [*state["model"].values(), *state["ema"].values(), *state["swa"].values()]
    tensors += [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
    assert tensors and all(v.dtype == torch.float32 for v in tensors)
    assert state["config"]["amp"] == "bf16"


def test_fp16_without_cuda_is_a_one_line_error(tmp_path, image_folder):
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS, "--amp", "fp16",
                        cwd=tmp_path, check=False)
    assert_one_line_error(result, "--amp fp16 needs a CUDA device", "--amp bf16 on cpu")


def test_grad_checkpointing_and_channels_last_train_the_same_weights(tmp_path, monkeypatch):
    """Recomputing activations changes memory, not arithmetic: bit-identical weights (dropout included,
    torch's checkpoint replays its random masks). channels_last reorders memory: equal up to rounding."""
    make_image_folder(tmp_path / "pets")
    monkeypatch.chdir(tmp_path)
    results = {}
    # On a CPU in fp32 the default layout is channels_last (utils.resolve_channels_last): "plain" turns it off.
    switches = dict(plain=["--channels_last", "off"], grad_checkpointing=["--channels_last", "off", "--grad_checkpointing"],
                    channels_last=[])
    for name, switch in switches.items():
        train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "3", "--sample_every", "0",
                   "--run_name", name, *switch)
        results[name] = load(f"checkpoints/{name}.pt")["model"]
    assert_same_tensors(results["plain"], results["grad_checkpointing"])
    # Adam moves each weight by about lr per step whatever the gradient's size, so a rounding-level
    # difference in a near-zero gradient (the zero-initialised layers) can flip a step's sign: up to
    # 2 x lr per step apart. The losses, which see every weight at once, agree closely.
    for key, value in results["plain"].items():
        assert torch.allclose(value, results["channels_last"][key], atol=3 * 2 * 2e-4 + 1e-6), key
    losses = {}
    for name in ("plain", "channels_last"):
        with open(f"samples/{name}/loss.csv") as f:
            losses[name] = [float(r["loss"]) for r in csv.DictReader(f)]
    assert losses["plain"] == pytest.approx(losses["channels_last"], rel=1e-4)


def test_compile_falls_back_with_a_note_where_it_cannot_compile(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this platform")

    monkeypatch.setattr(torch, "compile", no_compiler)
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0", "--compile")
    out = capsys.readouterr().out
    assert "note: --compile is unavailable here (RuntimeError: Dynamo is not supported" in out
    assert load("checkpoints/pets.pt")["step"] == 1


def test_tensorboard_flag_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UsageError, match="--tensorboard: the tensorboard package is not installed; pip install"):
        train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--tensorboard")


def test_tensorboard_logs_the_losses_per_noise_level(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")  # an optional extra, not in requirements.txt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "3", "--sample_every", "3",
               "--sample_steps", "2", "--tensorboard")
    events = EventAccumulator("samples/pets/tensorboard")
    events.Reload()
    assert {"loss", "loss_t0_4", "loss_t15_19", "train/lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert events.Tags()["images"] == ["samples"]


def test_checkpoints_from_before_exact_resume_still_resume(tmp_path, monkeypatch, capsys):
    """Older checkpoints saved one RNG state, no shared generator, and --amp as true/false."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "2", "--sample_every", "0")
    state = load("checkpoints/pets.pt")
    state["rng"] = dict(torch=state["rng"]["torch"][0], cuda=[])
    state["config"]["amp"] = False
    torch.save(state, "checkpoints/pets.pt")
    train_here(".", "--dataset_path", "pets", "--resume", "--max_steps", "3")
    assert "saved by an older train.py" in capsys.readouterr().out
    resumed = load("checkpoints/pets.pt")
    assert resumed["step"] == 3 and resumed["config"]["amp"] == "off"


def test_resume_says_which_given_flags_it_ignores(tmp_path, monkeypatch, capsys):
    """A run continues with its saved settings; a setting given again with another value is named in a
    note instead of being dropped silently. Run-control flags and unchanged values are not named."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "2", "--sample_every", "0",
               "--lr", "1e-3")
    capsys.readouterr()
    # --lr and --sample_every are typed with their default values: typed is what counts, not the value.
    train_here(".", "--dataset_path", "pets", "--resume", "--max_steps", "3", "--lr", "2e-4", "--amp", "bf16",
               "--channel_mults", "1", "2", "--sample_every", "1000")
    out = capsys.readouterr().out
    assert "these flags are ignored: --lr 0.0002 (the run's: 0.001); --amp bf16 (the run's: off)." in out
    assert "--max_steps" not in out.split("ignored")[1].split("\n")[0] and "--channel_mults" not in out
    resumed = load("checkpoints/pets.pt")
    assert resumed["step"] == 3 and resumed["config"]["lr"] == 1e-3 and resumed["config"]["amp"] == "off"
    assert resumed["config"]["sample_every"] == 1000  # a run-control flag, typed: it wins
    capsys.readouterr()
    train_here(".", "--dataset_path", "pets", "--resume", "--max_steps", "2")  # the run is at step 3 already
    assert "already at step 3, not below --max_steps 2: nothing to train" in capsys.readouterr().out
    # A data path typed for a run that read none (the built-in shapes) is not read, so it is named too.
    train_here(".", *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0", "--run_name", "built_in")
    capsys.readouterr()
    train_here(".", "--dataset_path", "pets", "--run_name", "built_in", "--resume", "--max_steps", "2")
    assert "ignored: --dataset_path pets (the run's: None)" in capsys.readouterr().out
    assert load("checkpoints/built_in.pt")["config"]["dataset_path"] is None


def test_resume_keeps_the_run_s_class_order_when_only_the_order_differs(tmp_path, monkeypatch, capsys):
    """Numbered folders 0..11 were ordered as text by older versions (0, 1, 10, 11, 2, ...): such a run
    resumes with its own order, every image labelled by its class name."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "nums", classes=[str(i) for i in range(12)], per_class=1)
    train_here(".", "--dataset_path", "nums", *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0")
    state = load("checkpoints/nums.pt")
    text_order = sorted(state["class_names"])                       # what an older version saved
    assert text_order[:4] == ["0", "1", "10", "11"]
    state["class_names"] = text_order
    torch.save(state, "checkpoints/nums.pt")
    capsys.readouterr()
    train_here(".", "--dataset_path", "nums", "--resume", "--max_steps", "2")
    assert "it keeps its own order" in capsys.readouterr().out
    assert load("checkpoints/nums.pt")["class_names"] == text_order
    from utils import ImageFolderDataset, reorder_classes
    dataset = ImageFolderDataset(str(tmp_path / "nums"), 8)
    reorder_classes(dataset, text_order)
    assert all(text_order[label] == os.path.basename(os.path.dirname(path)) for path, label in dataset.samples)
    from utils import TensorImageDataset
    arrays = TensorImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2]), ["a", "b", "c"])
    reorder_classes(arrays, ["c", "a", "b"])
    assert arrays.labels.tolist() == [1, 2, 0] and arrays.class_names == ["c", "a", "b"]


def test_a_single_class_folder_trains_an_unconditional_model_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets", classes=("cat",))
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0")
    assert "only one class folder (cat) holds images, so the model is unconditional" in capsys.readouterr().out
    assert load("checkpoints/pets_ema.pt")["class_names"] == []


def test_resume_refuses_data_whose_classes_changed(tmp_path, monkeypatch):
    """Labels are indices into the class list: a renamed class folder (same count) would swap them."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0")
    os.rename(tmp_path / "pets" / "cat", tmp_path / "pets" / "tiger")      # now dog, tiger: 'dog' moved to label 0
    with pytest.raises(UsageError, match=r"label 0 is 'dog' now, 'cat' saved"):
        train_here(".", "--dataset_path", "pets", "--resume", "--max_steps", "2")
    assert load("checkpoints/pets.pt")["step"] == 1


def test_rng_states_put_back_draw_the_same_numbers_again():
    """What makes a resumed run exact: every stream saved (scaling.rng_states) and put back
    (restore_rng_states) draws what it would have drawn; states from another number of processes are
    refused, so the caller can reseed and say so."""
    from scaling import SharedRandomness, restore_rng_states, rng_states
    cpu = torch.device("cpu")
    randomness = SharedRandomness(seed=3, rank=0, world_size=1, device=cpu)
    torch.manual_seed(7)
    saved = rng_states(randomness, cpu, world_size=1)
    first = (torch.rand(5), randomness.randn((2, 3)))
    torch.rand(11), randomness.randn((4, 3))  # the run goes on, then is stopped
    assert restore_rng_states(saved, randomness, cpu, rank=0, world_size=1)
    again = (torch.rand(5), randomness.randn((2, 3)))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not restore_rng_states(saved, randomness, cpu, rank=0, world_size=2)   # saved by 1 process, not 2
    assert not restore_rng_states(dict(torch=torch.get_rng_state(), cuda=[]), randomness, cpu, 0, 1)  # older file


def test_an_apple_gpu_run_saves_and_restores_its_dropout_stream(monkeypatch):
    """On MPS, dropout draws from the MPS generator, not torch's CPU one: it is saved too. (No Mac here:
    torch.mps's two calls are stood in for; the device object itself needs no Mac.)"""
    from scaling import SharedRandomness, restore_rng_states, rng_states
    mps_state, put_back = torch.tensor([1, 2, 3], dtype=torch.uint8), []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: mps_state.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", put_back.append)
    randomness = SharedRandomness(seed=3, rank=0, world_size=1, device=torch.device("cpu"))
    saved = rng_states(randomness, torch.device("mps"), world_size=1)
    assert torch.equal(saved["mps"], mps_state) and "mps" not in rng_states(randomness, torch.device("cpu"), 1)
    assert restore_rng_states(saved, randomness, torch.device("mps"), rank=0, world_size=1)
    assert len(put_back) == 1 and torch.equal(put_back[0], mps_state)


def test_the_log_s_quarters_are_named_as_they_are_binned_and_undo_importance_weights():
    """Quarter q holds the t with 4t // T == q; its column name says which t those are, for any T. With the
    loss-aware sampler the losses arrive as w L: a quarter's mean is sum(w L) / sum(w), the uniform-t mean."""
    from scaling import log_fields, step_statistics
    for timesteps in (8, 50, 250, 1000):
        for q, name in enumerate(log_fields(timesteps)[-4:]):
            first, last = map(int, name.removeprefix("loss_t").split("_"))
            assert [t for t in range(timesteps) if min(4 * t // timesteps, 3) == q] == list(range(first, last + 1))
    assert log_fields(50)[-4:] == ["loss_t0_12", "loss_t13_24", "loss_t25_37", "loss_t38_49"]
    t = torch.tensor([0, 1, 1, 7])                    # T = 8: quarter 0 holds t = 0, 1
    raw, weights = torch.tensor([4.0, 1.0, 1.0, 2.0]), torch.tensor([0.5, 2.0, 2.0, 1.0])
    loss, by_quarter, _, _ = step_statistics(raw * weights, t, 8, False, 1, weights=weights)
    assert loss == pytest.approx((raw * weights).mean().item())
    assert by_quarter[0] == pytest.approx((0.5 * 4 + 2 * 1 + 2 * 1) / (0.5 + 2 + 2)) and by_quarter[3] == 2.0


def test_the_log_records_the_rate_each_step_used_and_grids_are_not_training_time(tmp_path, monkeypatch):
    """loss.csv's lr is the rate the step's update used (lr_lambda of the step before it counts); and a
    --max_minutes budget counts training steps, not the time spent drawing grids or saving. train.py's
    clock is replaced by one that only moves when told: 0.25 s per training step, 10 s per grid."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    clock = [100.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_accumulate = train.accumulate_gradients
    def timed_accumulate(*args, **kwargs):
        clock[0] += 0.25
        return real_accumulate(*args, **kwargs)
    monkeypatch.setattr(train, "accumulate_gradients", timed_accumulate)
    monkeypatch.setattr(train, "sample_grid", lambda *a, **k: (clock.__setitem__(0, clock[0] + 10.0), ("slow grid", None))[1])
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "4", "--sample_every", "1",
               "--max_minutes", "0.02", "--lr", "2e-4")  # 1.2 s of training; the grids alone take 40 s
    state = load("checkpoints/pets.pt")
    assert state["step"] == 4 and state["train_seconds"] == pytest.approx(1.0)
    with open("samples/pets/loss.csv") as f:
        rates = [float(row["lr"]) for row in csv.DictReader(f)]
    # Step k's update uses lr_lambda(k) with the time used before it, 0.25 k of the 1.2 s: warm-up over 2
    # steps ((k + 1) / 2 of the peak) capped by the budget's cosine, then the cosine of the steps or the
    # time, whichever is further along.
    expected = [2e-4 * train.lr_lambda(k, 2, 4, 0.25 * k / 1.2) for k in range(4)]
    assert rates == pytest.approx(expected, rel=1e-5)
    assert rates[0] == pytest.approx(1e-4) and rates[1] < 2e-4  # the cap: the time cosine is below 1 at k = 1


def test_a_grid_s_random_draws_are_undone_on_cpu_and_on_an_apple_gpu(monkeypatch):
    """forked_rng puts back the CPU state, and on MPS the MPS generator's too (dropout draws from it)."""
    from scaling import forked_rng
    before = torch.get_rng_state()
    with forked_rng(torch.device("cpu")):
        torch.rand(100)
    assert torch.equal(torch.get_rng_state(), before)
    mps_state, calls = torch.tensor([7, 7], dtype=torch.uint8), []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: calls.append("get") or mps_state.clone())  # older torch:
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: calls.append(state.tolist()))      # no device
    with forked_rng(torch.device("mps")):
        torch.rand(3)
    assert calls == ["get", [7, 7]] and torch.equal(torch.get_rng_state(), before)


def test_training_log_appends_at_flush_redraws_the_plot_and_is_silent_off_process_zero(tmp_path):
    from scaling import TrainingLog, log_fields
    log = TrainingLog(str(tmp_path / "run"), timesteps=8, resumed_step=None)
    assert (tmp_path / "run/loss.csv").read_text().strip() == ",".join(log_fields(8))
    for step in (1, 2, 3):
        log.add([step, 1.0 / step, 2e-4, 100.0, 50.0, 0.5, 0.4, float("nan"), 0.2])
    assert len((tmp_path / "run/loss.csv").read_text().splitlines()) == 1     # kept in memory until a flush
    log.flush()
    with open(tmp_path / "run/loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[1]["loss"] == "0.5" and rows[0]["loss_t4_5"] == "nan"
    assert (tmp_path / "run/loss.png").is_file()
    # Resumed at step 2: the log is cut back to the steps the checkpoint holds.
    TrainingLog(str(tmp_path / "run"), timesteps=8, resumed_step=2)
    with open(tmp_path / "run/loss.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2"]
    # A log whose quarters were named by the older rule (T = 50: loss_t0_11, ...) is kept and renamed.
    from scaling import LOG_FIELDS
    older = LOG_FIELDS + ["loss_t0_11", "loss_t12_24", "loss_t25_36", "loss_t37_49"]
    (tmp_path / "cold").mkdir()
    (tmp_path / "cold/loss.csv").write_text(",".join(older) + "\n1,0.5,0.0001,10,5,1,1,1,1\n")
    TrainingLog(str(tmp_path / "cold"), timesteps=50, resumed_step=1)
    with open(tmp_path / "cold/loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == log_fields(50) and rows[1][0] == "1" and not (tmp_path / "cold/loss_before_resume.csv").exists()
    # Process 1 of a torchrun run writes nothing.
    other = TrainingLog(str(tmp_path / "other"), timesteps=8, active=False)
    other.add([1, 1.0, 2e-4, 100.0, 50.0, 0.5, 0.4, 0.3, 0.2])
    other.flush()
    assert not (tmp_path / "other").exists() and other.rows == []


def test_unwritable_sample_folder_fails_at_start_before_any_training_step(tmp_path, image_folder, monkeypatch):
    """Like --checkpoint_dir: a --sample_dir that cannot be made (under a file) is one line at start-up."""
    from ddpm import GaussianDiffusion
    steps, real_loss = [], GaussianDiffusion.training_loss
    monkeypatch.setattr(GaussianDiffusion, "training_loss", lambda *a, **k: steps.append(1) or real_loss(*a, **k))
    (tmp_path / "a_file").write_text("not a folder")
    result = run_script("train.py", "--dataset_path", image_folder, *TINY_TRAIN_FLAGS,
                        "--sample_dir", "a_file/samples", cwd=tmp_path, check=False)
    assert_one_line_error(result, "--sample_dir a_file/samples", "cannot write there", "is a file")
    assert steps == []  # no training step was taken
    assert not (tmp_path / "checkpoints").exists() or os.listdir(tmp_path / "checkpoints") == []


def test_a_second_signal_during_the_save_quits_at_once_without_saving(tmp_path, monkeypatch, capsys):
    """README, Runs that survive interruption: the first Ctrl-C/SIGTERM finishes the step and saves; a second
    one, arriving while that save writes, quits at once (exit 130) and leaves the last checkpoint as it was."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    real_update_ema, real_save, first_sent = train.update_ema, torch.save, []
    read = lambda: {name: (tmp_path / "checkpoints" / name).read_bytes() for name in ("pets.pt", "pets_ema.pt")}

    def signal_during_step_3(ema_model, model, decay, step):
        if step == 2:  # the first signal, during step 3: the step finishes, step 4 is the last, then the save
            first_sent.append(read())  # the checkpoint of step 2 (--save_every 2), as it is now
            signal.raise_signal(signal.SIGTERM)
        real_update_ema(ema_model, model, decay, step)

    def signal_while_saving(obj, f, *args, **kwargs):
        if first_sent:  # the save on the way out: a second signal arrives while it writes
            signal.raise_signal(signal.SIGINT)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train, "update_ema", signal_during_step_3)
    monkeypatch.setattr(torch, "save", signal_while_saving)
    try:
        train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "10", "--save_every", "2",
                   "--sample_every", "0", expect_exit=130)
    except KeyboardInterrupt:  # would stop the whole pytest session: fail this test instead
        pytest.fail("the second signal's KeyboardInterrupt escaped train.main instead of exit code 130")
    captured = capsys.readouterr()
    assert "SIGTERM: stopping after this step and saving a checkpoint" in captured.err
    assert "stopped at step 4 without saving; the last checkpoint checkpoints/pets.pt is kept" in captured.out
    assert "interrupted at step" not in captured.out  # the message of a run that did save
    monkeypatch.setattr(torch, "save", real_save)
    assert len(first_sent) == 1 and read() == first_sent[0]  # both files byte for byte as before the signals
    assert load("checkpoints/pets.pt")["step"] == load("checkpoints/pets_ema.pt")["step"] == 2  # the save of step 2
    assert sorted(os.listdir("checkpoints")) == ["pets.pt", "pets_ema.pt"]  # no half-written temporary left
    # ... and that checkpoint is whole: the run resumes from it
    train_here(".", "--dataset_path", "pets", "--resume", "--max_steps", "3")
    assert load("checkpoints/pets.pt")["step"] == 3


def test_a_run_named_before_the_run_name_rule_still_resumes(tmp_path, monkeypatch):
    """Names ending like another run's files (faces_ema) are refused for new runs only: an existing run
    with such a name, made by an older version, resumes."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "pets")
    with pytest.raises(UsageError, match="--run_name 'faces_ema'"):
        train.main(["--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--run_name", "faces_ema"])
    train_here(".", "--dataset_path", "pets", *TINY_TRAIN_FLAGS, "--max_steps", "1", "--sample_every", "0",
               "--run_name", "faces")
    for suffix in ("_ema", ""):  # as an older version would have named them (the EMA file first)
        os.rename(f"checkpoints/faces{suffix}.pt", f"checkpoints/faces_ema{suffix}.pt")
    train_here(".", "--dataset_path", "pets", "--run_name", "faces_ema", "--resume", "--max_steps", "2")
    assert load("checkpoints/faces_ema.pt")["step"] == 2
