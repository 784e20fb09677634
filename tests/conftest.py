"""Shared test helpers. Tests make their own tiny data; none reads a real dataset."""
import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)

# The smallest settings that still exercise every part of train.py: 16x16 images, a two-level
# UNet with one residual block per level, T = 20.
TINY_TRAIN_FLAGS = ["--image_size", "16", "--base_channels", "16", "--channel_mults", "1", "2",
                    "--num_res_blocks", "1", "--timesteps", "20", "--batch_size", "4", "--warmup_steps", "2",
                    "--num_samples", "4", "--device", "cpu"]


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from the same global torch seed, so the weights a test builds (and any draw it
    does not seed itself) do not depend on which tests ran before it in the same process."""
    torch.manual_seed(0)


def randomise_zero_inits(model):
    """The output conv and each block's last layer start at zero (so the untrained UNet outputs 0);
    give them random weights so that tests can see every input's influence."""
    torch.manual_seed(0)
    for p in model.parameters():
        if torch.all(p == 0):
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def record_step_noise(monkeypatch):
    """Every torch.randn_like draw from here on (the samplers' per-step z), in a list."""
    drawn, real_randn_like = [], torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: drawn.append(real_randn_like(x, **k)) or drawn[-1])
    return drawn


def correlation(a, b):
    """Pearson correlation of two tensors' values."""
    return torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1].item()


def make_image_folder(root, classes=("cat", "dog"), per_class=6, seed=0):
    """A folder of small random PNG/JPEG images of assorted sizes and modes, one subfolder per class."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(14, 30, 2)
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = Image.fromarray(array)
            if i % 3 == 1:
                image = image.convert("L")
            image.save(root / c / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


# Tools that must run in a process of their own: both benchmarks time and measure the memory of
# their own process (and start children of their own).
OWN_PROCESS_SCRIPTS = ("tools/benchmark.py", "tools/memory_benchmark.py")


def run_script(script, *args, cwd, timeout=180, check=True, in_process=None):
    """Run train.py / sample.py / a tool as a user would, in cwd, and return the CompletedProcess.
    in_process: run the script's __main__ block in this process (runpy), with the same sys.path[0],
    stdout, stderr and exit code a subprocess would give, minus the 3-10 seconds of starting Python
    and importing torch anew, which made up most of the suite's time on a slow 2-core machine. The
    default (None) does so for every script but OWN_PROCESS_SCRIPTS; the scripts restore their signal
    handlers and change no global state but the random seeds. in_process=False forces a subprocess
    (Ctrl-C, kill -9 and torchrun tests start their own with Popen). timeout holds either way: a
    script still running after it fails the test instead of stalling the suite."""
    if in_process is None:
        in_process = script not in OWN_PROCESS_SCRIPTS
    if in_process:
        return run_in_process(script, args, cwd, check, timeout)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


class ScriptTimeout(BaseException):
    """Raised into an in-process script that has run past its timeout. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` in the script can swallow it."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raise ScriptTimeout in this (main) thread after `seconds`, through a SIGALRM timer: the
    in-process counterpart of subprocess.run's timeout. Python delivers it between bytecodes, so it
    also stops a loop that never ends; only one stuck inside a single C call goes on. No limit where
    there is no SIGALRM (Windows) or off the main thread."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise ScriptTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_in_process(script, args, cwd, check, timeout):
    argv, path, folder = sys.argv, list(sys.path), os.getcwd()
    out, err, code, timed_out = io.StringIO(), io.StringIO(), 0, False
    try:
        sys.argv = [str(ROOT / script), *map(str, args)]
        sys.path.insert(0, str((ROOT / script).parent))  # what `python script` puts first
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with time_limit(timeout):
                    runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as stop:  # what the interpreter would make of sys.exit(...)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
                    code = 1
                else:
                    code = stop.code or 0
            except ScriptTimeout:
                timed_out = True
            except Exception:  # an uncaught exception: a traceback, as the interpreter prints it
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        sys.argv = argv
        sys.path[:] = path  # also drops the repository root that each tool puts first
        os.chdir(folder)
    if timed_out:  # as subprocess.run's TimeoutExpired: a failure whatever `check` says
        raise AssertionError(f"{script} was still running after its {timeout} s timeout:\n"
                             f"{out.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}")
    result = subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} failed ({code}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def assert_one_line_error(result, *fragments):
    """Bad input must end in a short 'error: ...' line naming the problem, never a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "pets")
