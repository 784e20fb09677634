"""
Tests for tools/resize_dataset.py, tools/clean_dataset.py and tools/export_dataset.py.

The tools are run through their command lines (run_tool), on tiny images these tests draw
themselves in tmp_path; no real dataset is ever touched.
Run with:  python -m pytest -q tests/test_tools.py
"""

import csv
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from utils import UsageError

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run_tool(script, *args, timeout=60):
    """The tool's command line, as a process of its own for the PIL-only tools (they start quickly, and
    resize_dataset.py starts worker processes); export_dataset.py imports torch through utils.py, so
    it runs inside the test process (conftest.run_script), without importing torch anew each time."""
    if script == "export_dataset.py":
        return run_script(f"tools/{script}", *args, cwd=tempfile.gettempdir(), timeout=timeout, check=False)
    return subprocess.run([sys.executable, str(TOOLS / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def snapshot(root):
    """{relative path: bytes} of every file under root, to prove nothing changed."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *words):
    """Bad input must give a short 'error: ...' message, never a Python traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0]


def noise(w, h, mode="RGB", seed=0):
    """A w x h image of random pixels: every call with a new seed gives new bytes."""
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def encode(img, fmt, **kwargs):
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# resize_dataset.py


@pytest.fixture
def src(tmp_path):
    """Two class folders (one with a subfolder), mixed sizes, aspect ratios and modes,
    one corrupted file and two hidden files that must be ignored."""
    root = tmp_path / "src"
    for d in ["cat", "dog/sub", ".hidden"]:
        (root / d).mkdir(parents=True)
    # wide image of three vertical bands red | green | blue: a centre crop must be green
    bands = np.zeros((16, 48, 3), dtype=np.uint8)
    bands[:, :16, 0] = bands[:, 16:32, 1] = bands[:, 32:, 2] = 255
    Image.fromarray(bands).save(root / "cat/bands.png")
    noise(30, 20, seed=1).save(root / "cat/photo.jpg", quality=90)
    noise(20, 40, "RGBA", seed=2).save(root / "cat/alpha.png")
    noise(40, 30, "L", seed=3).save(root / "dog/gray.png")
    noise(25, 25, seed=4).convert("P").save(root / "dog/sub/palette.png")
    (root / "dog/broken.png").write_bytes(b"this is not an image" * 10)
    noise(20, 20, seed=5).save(root / ".hidden/skipme.png")
    noise(20, 20, seed=6).save(root / "cat/.skipme.png")
    return root


def test_resize_writes_square_images_in_same_tree(tmp_path, src):
    before = snapshot(src)
    dst = tmp_path / "out"
    r = run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1)
    assert r.returncode == 0, r.stderr

    out = snapshot(dst)
    # same tree and names, corrupted file not written, hidden files ignored
    assert sorted(out) == ["cat/alpha.png", "cat/bands.png", "cat/photo.jpg",
                           "dog/gray.png", "dog/sub/palette.png"]
    modes = {}
    for rel in out:
        with Image.open(dst / rel) as im:
            assert im.size == (8, 8), rel
            modes[rel] = im.mode
    # RGB and L are kept; RGBA and palette become RGB so every format can save them
    assert modes == {"cat/alpha.png": "RGB", "cat/bands.png": "RGB", "cat/photo.jpg": "RGB",
                     "dog/gray.png": "L", "dog/sub/palette.png": "RGB"}
    with Image.open(dst / "cat/photo.jpg") as im:
        assert im.format == "JPEG"  # --format keep
    # centre crop of red|green|blue is green
    r_, g, b = Image.open(dst / "cat/bands.png").getpixel((4, 4))
    assert g > 200 and r_ < 60 and b < 60
    # the corrupted file is reported by name; the source is untouched
    assert "written:  5" in r.stdout
    assert "failed:   1" in r.stdout and "dog/broken.png" in r.stdout
    assert snapshot(src) == before


def test_resize_skips_existing_unless_overwrite(tmp_path, src):
    dst = tmp_path / "out"
    assert run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1).returncode == 0
    marker = dst / "cat/bands.png"
    marker.write_bytes(b"old output")
    r = run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1)
    assert r.returncode == 0 and "skipped:  5" in r.stdout
    assert marker.read_bytes() == b"old output"  # skipped, not rewritten
    r = run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1, "--overwrite")
    assert r.returncode == 0 and "written:  5" in r.stdout
    assert Image.open(marker).size == (8, 8)
    # Another --size into the same folder would skip every file and leave 8x8 images: said, not done.
    assert_one_line_error(run_tool("resize_dataset.py", src, dst, "--size", 6, "--workers", 1),
                          "already holds 8x8 images", "--overwrite")


def test_resize_removes_temp_files_a_killed_run_left(tmp_path, src):
    """kill -9 mid-save leaves a hidden .NAME.tmpPID; the next run deletes it once PID is gone, and
    keeps a live writer's temp file and anything that only looks similar."""
    dst = tmp_path / "out"
    assert run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1).returncode == 0
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = dst / f"cat/.bands.png.tmp{int(gone.stdout)}"
    live, lookalike = dst / f"cat/.alpha.png.tmp{os.getpid()}", dst / "dog/.notes.tmpdraft"
    for path in (stale, live, lookalike):
        path.write_bytes(b"partial")
    r = run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1)
    assert r.returncode == 0 and "removed 1 partial temp files" in r.stdout
    assert not stale.exists() and live.exists() and lookalike.exists()


def test_resize_never_leaves_two_formats_of_one_image_in_the_output(tmp_path, src):
    """A rerun with another --format would write cat/photo.png beside the cat/photo.jpg of the first run
    (--overwrite replaces only same-named files), so the loader would train on both: refused."""
    dst = tmp_path / "out"
    assert run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1).returncode == 0
    before = snapshot(dst)
    for extra in ([], ["--overwrite"]):
        refused = run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1, "--format", "png", *extra)
        assert_one_line_error(refused, "cat/photo.jpg", "another --format", "cat/photo.png")
        assert snapshot(dst) == before
    # The same --format again is a plain rerun: everything skipped.
    again = run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1)
    assert again.returncode == 0 and "skipped:  5" in again.stdout


def test_resize_quality_that_would_do_nothing_is_said(tmp_path, src):
    assert_one_line_error(run_tool("resize_dataset.py", src, tmp_path / "out", "--format", "png", "--quality", 5),
                          "--quality 5", "--format png")
    assert not (tmp_path / "out").exists()
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    noise(12, 12, seed=1).save(pngs / "a.png")
    kept = run_tool("resize_dataset.py", pngs, tmp_path / "kept", "--size", 8, "--workers", 1, "--quality", 5)
    assert kept.returncode == 0 and "--quality 5 changes nothing" in kept.stdout
    jpg = run_tool("resize_dataset.py", src, tmp_path / "jpg", "--size", 8, "--workers", 1, "--quality", 5)
    assert jpg.returncode == 0 and "changes nothing" not in jpg.stdout  # cat/photo.jpg is saved at quality 5


def test_resize_into_a_folder_that_cannot_be_made_is_one_error_up_front(tmp_path, src):
    """A path under a file cannot become a folder: said once, with a failing exit code, not as one
    failure per image and exit 0."""
    (tmp_path / "a_file").write_text("x")
    for extra in ([], ["--dry_run"]):
        refused = run_tool("resize_dataset.py", src, tmp_path / "a_file" / "out", "--size", 8, "--workers", 1, *extra)
        assert_one_line_error(refused, "cannot create or write output folder", "a_file")
        assert "written" not in refused.stdout


def test_resize_parallel_png_and_forced_mode(tmp_path, src):
    # 2 workers: exercises the process-pool path (the other tests run in-process)
    dst = tmp_path / "out"
    r = run_tool("resize_dataset.py", src, dst, "--size", 6, "--workers", 2, "--format", "png", "--mode", "L")
    assert r.returncode == 0, r.stderr
    out = snapshot(dst)
    assert sorted(out) == ["cat/alpha.png", "cat/bands.png", "cat/photo.png",
                           "dog/gray.png", "dog/sub/palette.png"]
    for rel in out:
        with Image.open(dst / rel) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (6, 6)), rel


def test_resize_dry_run_writes_nothing(tmp_path, src):
    dst = tmp_path / "out"
    r = run_tool("resize_dataset.py", src, dst, "--size", 8, "--workers", 1, "--dry_run")
    assert r.returncode == 0, r.stderr
    assert not dst.exists()
    assert "would write:  5" in r.stdout and "dog/broken.png" in r.stdout


def test_resize_bad_input_is_one_line_error(tmp_path, src):
    before = snapshot(src)
    assert_one_line_error(run_tool("resize_dataset.py", src, src / "cat/out", "--size", 8), "inside")
    assert_one_line_error(run_tool("resize_dataset.py", src, src, "--size", 8), "inside")
    assert_one_line_error(run_tool("resize_dataset.py", src, src.parent, "--size", 8), "contains source folder")
    assert_one_line_error(run_tool("resize_dataset.py", tmp_path / "nope", tmp_path / "out"), "nope")
    assert_one_line_error(run_tool("resize_dataset.py", src, tmp_path / "out", "--size", 0), "--size")
    assert snapshot(src) == before
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# clean_dataset.py

# what the fixture below contains, and how each file must be classified
EXPECTED = {
    "cls1/corrupt.png": "corrupted",  # random bytes
    "cls2/trunc.png": "corrupted",    # truncated PNG: verify() already fails on its checksums
    "cls1/trunc.jpg": "truncated",    # truncated JPEG: opens and verifies, fails a full load
    "cls2/small.png": "too_small",
    "cls2/a_good.png": "duplicate",   # same bytes as a_good.png, which sorts first
    "cls2/cmyk.jpg": "odd_mode",
}


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    (root / "cls1").mkdir(parents=True)
    (root / "cls2").mkdir()
    good = encode(noise(40, 40, seed=10), "PNG")
    (root / "a_good.png").write_bytes(good)
    (root / "cls2/a_good.png").write_bytes(good)
    (root / "cls1/corrupt.png").write_bytes(bytes(np.random.default_rng(11).integers(0, 256, 500, dtype=np.uint8)))
    jpg = encode(noise(64, 64, seed=12), "JPEG", quality=90)
    (root / "cls1/trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = encode(noise(64, 64, seed=13), "PNG")
    (root / "cls2/trunc.png").write_bytes(png[: len(png) // 2])
    noise(8, 8, seed=14).save(root / "cls2/small.png")
    noise(40, 40, seed=15).convert("CMYK").save(root / "cls2/cmyk.jpg")
    return root


def test_clean_reports_without_changing_anything(tmp_path, data):
    before = snapshot(data)
    report = tmp_path / "report.csv"
    r = run_tool("clean_dataset.py", data, "--report", report)
    assert r.returncode == 0, r.stderr
    # the CSV names every problem file with its category, and nothing else
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["path"]: row["category"] for row in rows} == EXPECTED
    # the printed report lists each file under its category's heading
    lines = r.stdout.splitlines()
    for rel, category in EXPECTED.items():
        heading = lines.index(f"{category}:")
        section = lines[heading + 1:]
        section = section[: next((i for i, l in enumerate(section) if not l.startswith("  ")), len(section))]
        assert any(l.strip().startswith(rel + "  (") for l in section), (rel, category, r.stdout)
    assert "ok         1" in r.stdout
    # report only: nothing moved, no rejected folder, and the fix is spelled out
    assert snapshot(data) == before
    assert not (tmp_path / "data_rejected").exists()
    assert "--move" in r.stdout
    assert "BytesIO" not in r.stdout  # Pillow's name for the in-memory copy; the report names the file


def test_clean_move_moves_bad_files_beside_dataset(tmp_path, data):
    before = snapshot(data)
    rejected = tmp_path / "data_rejected"
    r = run_tool("clean_dataset.py", data, "--move")
    assert r.returncode == 0, r.stderr
    for rel, category in EXPECTED.items():
        if category == "odd_mode":
            continue  # a warning only: stays without --move_odd_mode
        assert (rejected / category / rel).read_bytes() == before[rel]
        assert not (data / rel).exists()
    # the good image, the first copy of the duplicate and the odd-mode image stay
    assert snapshot(data) == {rel: before[rel] for rel in ["a_good.png", "cls2/cmyk.jpg"]}

    # a second bad file with an already-used name must not overwrite the first one
    (data / "cls1/corrupt.png").write_bytes(b"other garbage")
    r = run_tool("clean_dataset.py", data, "--move", "--move_odd_mode")
    assert r.returncode == 0, r.stderr
    assert (rejected / "corrupted/cls1/corrupt.png").read_bytes() == before["cls1/corrupt.png"]
    assert (rejected / "corrupted/cls1/corrupt_1.png").read_bytes() == b"other garbage"
    assert (rejected / "odd_mode/cls2/cmyk.jpg").read_bytes() == before["cls2/cmyk.jpg"]
    assert snapshot(data) == {"a_good.png": before["a_good.png"]}


def test_clean_dry_run_move_changes_nothing(tmp_path, data):
    before = snapshot(data)
    r = run_tool("clean_dataset.py", data, "--move", "--dry_run")
    assert r.returncode == 0, r.stderr
    assert snapshot(data) == before
    assert not (tmp_path / "data_rejected").exists()
    assert "would move cls1/trunc.jpg" in r.stdout and "would move 5 files" in r.stdout


def test_clean_bad_input_is_one_line_error(tmp_path, data):
    assert_one_line_error(run_tool("clean_dataset.py", tmp_path / "nope"), "nope")
    assert_one_line_error(run_tool("clean_dataset.py", data, "--move", "--rejected_dir", data / "rej"), "inside")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_tool("clean_dataset.py", tmp_path / "empty"), "no images")
    assert_one_line_error(run_tool("clean_dataset.py", data, "--report", tmp_path), "is a folder")
    assert not (data / "rej").exists()


def test_clean_report_path_that_would_overwrite_a_file_is_refused_before_the_scan(tmp_path, data):
    """--report inside the dataset once turned an image into CSV text (even with --dry_run); a name
    that is not .csv, or a CSV this tool did not write, would be overwritten as well."""
    before = snapshot(data)
    for report in (data / "a_good.png", data / "cls1" / "problems.csv", data / "cls1" / ".." / "x.csv"):
        assert_one_line_error(run_tool("clean_dataset.py", data, "--report", report, "--dry_run"), "inside data folder")
    assert_one_line_error(run_tool("clean_dataset.py", data, "--report", tmp_path / "notes.txt"), "name a .csv file")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nx.png,3\n")
    assert_one_line_error(run_tool("clean_dataset.py", data, "--report", labels), "not a report this tool wrote")
    assert labels.read_text() == "file,label\nx.png,3\n" and snapshot(data) == before
    assert not (tmp_path / "notes.txt").exists()
    # its own report, from an earlier run, is replaced
    report = tmp_path / "report.csv"
    for _ in range(2):
        r = run_tool("clean_dataset.py", data, "--report", report)
        assert r.returncode == 0, r.stderr
        assert len(list(csv.DictReader(open(report, newline="")))) == len(EXPECTED)


def test_clean_move_keeps_the_file_a_duplicate_link_points_to(tmp_path):
    """cats/a.png -> z.png has the bytes of z.png and sorts first; moving z.png as its 'duplicate' left a
    link to nothing. The real file stays and the link is moved (as a link); a second such link moved
    later does not replace the first, though that one points nowhere from the rejected folder."""
    data = tmp_path / "sl"
    (data / "cats").mkdir(parents=True)
    noise(12, 12, seed=1).save(data / "cats" / "z.png")
    real = (data / "cats" / "z.png").read_bytes()
    os.symlink("z.png", data / "cats" / "a.png")
    rejected = tmp_path / "sl_rejected" / "duplicate" / "cats"
    for moved in ("a.png", "a_1.png"):
        r = run_tool("clean_dataset.py", data, "--min_size", 0, "--move")
        assert r.returncode == 0, r.stderr
        assert "cats/a.png  (a link to cats/z.png, which stays)" in r.stdout
        z = data / "cats" / "z.png"
        assert not z.is_symlink() and z.read_bytes() == real and not os.path.lexists(data / "cats" / "a.png")
        assert os.readlink(rejected / moved) == "z.png"
        os.symlink("z.png", data / "cats" / "a.png")  # the same link again, for the second round
    assert sorted(os.listdir(rejected)) == ["a.png", "a_1.png"]


def test_clean_move_to_a_folder_it_cannot_write_stops_before_moving_anything(tmp_path, data, monkeypatch):
    """The check runs before the scan, so no file is moved before a failure. The tests run as root, for
    whom every folder is writable: os.access is stood in for, saying no for tmp_path (where
    data_rejected would be created) and yes elsewhere, inside this process."""
    before = snapshot(data)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    refused = run_script("tools/clean_dataset.py", data, "--move", cwd=tmp_path, check=False, in_process=True)
    assert_one_line_error(refused, "cannot create or write the rejected folder", str(tmp_path / "data_rejected"))
    assert snapshot(data) == before and not (tmp_path / "data_rejected").exists()


# --------------------------------------------------------------------------- export_dataset.py


def test_export_npz_writes_one_folder_per_label(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 6, 7), dtype=np.uint8)
    np.savez(tmp_path / "digits.npz", x_train=x, y_train=np.array([3, 1, 3, 0, 1]))
    result = run_tool("export_dataset.py", tmp_path / "digits.npz", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0", "1", "3"]
    assert sorted(p.name for p in (tmp_path / "out" / "3").iterdir()) == ["0.png", "2.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "3" / "2.png")), x[2])  # lossless
    # Training on the .npz and on its export reads the same pixels, whatever the size asked for.
    from utils import ImageFolderDataset, load_npz_dataset
    from_npz, from_folder = load_npz_dataset(str(tmp_path / "digits.npz"), 8), ImageFolderDataset(str(tmp_path / "out"), 8)
    assert from_npz.class_names == from_folder.class_names == ["0", "1", "3"]
    for path, label in from_folder.samples:
        index = int(path.rsplit("/", 1)[1].split(".")[0])
        assert torch.equal(from_folder[from_folder.samples.index((path, label))][0], from_npz[index][0])
        assert from_npz[index][1] == label
    again = run_tool("export_dataset.py", tmp_path / "digits.npz", tmp_path / "out")
    assert_one_line_error(again, "not an empty folder")
    (tmp_path / "a_file").write_text("x")
    assert_one_line_error(run_tool("export_dataset.py", tmp_path / "digits.npz", tmp_path / "a_file"),
                          "a_file exists and is not an empty folder")
    assert_one_line_error(run_tool("export_dataset.py", tmp_path / "none.npz", tmp_path / "o2"), "no such file")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "digits.npz").read_bytes()[:200])  # a half-copied file
    assert_one_line_error(run_tool("export_dataset.py", tmp_path / "cut.npz", tmp_path / "o3"),
                          "cut.npz: cannot read arrays x_train and y_train")


def test_an_export_stopped_midway_is_never_taken_for_a_finished_one(tmp_path, monkeypatch):
    """The images go into out.partial, renamed to out at the end. Ctrl-C removes the partial folder; one a
    kill -9 left (standing in: Ctrl-C with shutil.rmtree doing nothing) is removed by the next run,
    which then exports everything. A folder of that name the tool did not make is never removed."""
    np.savez(tmp_path / "digits.npz", x_train=np.zeros((5, 4, 4), dtype=np.uint8), y_train=np.arange(5) % 2)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    real_save = Image.Image.save

    def save_twice_then_ctrl_c(image, *args, **kwargs):
        if len(list(partial.rglob("*.png"))) == 2:
            raise KeyboardInterrupt
        return real_save(image, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", save_twice_then_ctrl_c)
        stopped = run_tool("export_dataset.py", tmp_path / "digits.npz", out)
        assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
        assert not out.exists() and not partial.exists()
        patch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # killed: no chance to clean up
        assert run_tool("export_dataset.py", tmp_path / "digits.npz", out).returncode == 130
        assert not out.exists() and len(list(partial.rglob("*.png"))) == 2
    rerun = run_tool("export_dataset.py", tmp_path / "digits.npz", out)
    assert rerun.returncode == 0, rerun.stderr
    assert "removed" in rerun.stdout and not partial.exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["0", "0/0.png", "0/2.png", "0/4.png",
                                                                           "1", "1/1.png", "1/3.png"]
    (tmp_path / "other.partial").mkdir()
    assert_one_line_error(run_tool("export_dataset.py", tmp_path / "digits.npz", tmp_path / "other"),
                          "other.partial", "not left by this tool")
    assert (tmp_path / "other.partial").is_dir() and not (tmp_path / "other").exists()


def test_export_refuses_labels_and_flags_that_would_write_the_wrong_thing(tmp_path):
    """A label becomes a folder name: '../../x' wrote outside out_dir, 'a/b' a nested class, '' into out_dir
    itself, '.x' a hidden folder the loader skips. --limit -3 exported everything; --image_size 0 ended in
    a traceback after a partial folder; --image_size does nothing to an .npz. All refused up front."""
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    for label in ("../../escaped", "a/b", "", ".", "..", ".hidden"):
        np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 4, 4), dtype=np.uint8), y_train=np.array(["ok", label]))
        assert_one_line_error(run_tool("export_dataset.py", tmp_path / "bad.npz", work / "out"),
                              f"label {label!r} (image 1) cannot be a class folder name")
    np.savez(tmp_path / "ok.npz", x_train=np.zeros((3, 4, 4), dtype=np.uint8), y_train=np.arange(3))
    assert_one_line_error(run_tool("export_dataset.py", tmp_path / "ok.npz", work / "out", "--limit", -3), "--limit -3")
    assert_one_line_error(run_tool("export_dataset.py", tmp_path / "ok.npz", work / "out", "--image_size", 8),
                          "--image_size applies to the built-in datasets")
    for size in (0, -5):
        assert_one_line_error(run_tool("export_dataset.py", "shapes", work / "out", "--image_size", size),
                              f"--image_size {size}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.npz", "deep", "er", "ok.npz"]
    # --limit 0 is all of them, --limit 2 the first two
    for limit, count in ((0, 3), (2, 2)):
        done = run_tool("export_dataset.py", tmp_path / "ok.npz", work / f"out{limit}", "--limit", limit)
        assert done.returncode == 0 and len(list((work / f"out{limit}").rglob("*.png"))) == count


def test_npz_with_more_than_ten_classes_keeps_its_label_order_in_the_export(tmp_path):
    """Labels 0..11: the .npz orders them as numbers, and so does its exported folder (not 0, 1, 10, 11, 2)."""
    from utils import ImageFolderDataset, load_npz_dataset
    x = np.arange(12, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2) * 20   # image i has grey 20 i
    np.savez(tmp_path / "twelve.npz", x_train=x, y_train=np.arange(12))
    assert run_tool("export_dataset.py", tmp_path / "twelve.npz", tmp_path / "out").returncode == 0
    from_npz, from_folder = load_npz_dataset(str(tmp_path / "twelve.npz"), 4), ImageFolderDataset(str(tmp_path / "out"), 4)
    assert from_npz.class_names == from_folder.class_names == [str(i) for i in range(12)]
    for image, label in (from_folder[i] for i in range(12)):
        assert image.flatten()[0].item() == 20 * label  # label i is the image of class i in both


def test_npz_label_columns_and_rgba_arrays_train_as_their_export_does(tmp_path):
    """Labels stored as a column [N x 1] are labels; one-hot rows and channels-first images are refused;
    an RGBA array is colour (on white), in the .npz and in its export alike."""
    from utils import ImageFolderDataset, load_npz_dataset
    x = np.zeros((3, 8, 8, 4), dtype=np.uint8)
    x[:, 2:6, 2:6] = [200, 30, 30, 255]                      # an opaque red square on transparent black
    np.savez(tmp_path / "icons.npz", x_train=x, y_train=np.array([[7], [3], [7]]))
    assert run_tool("export_dataset.py", tmp_path / "icons.npz", tmp_path / "out").returncode == 0
    from_npz, from_folder = load_npz_dataset(str(tmp_path / "icons.npz"), 8), ImageFolderDataset(str(tmp_path / "out"), 8)
    assert from_npz.class_names == from_folder.class_names == ["3", "7"] and from_npz.labels.tolist() == [1, 0, 1]
    assert from_npz.channels == from_folder.channels == 3
    assert from_npz[0][0][:, 0, 0].tolist() == [255, 255, 255] and from_npz[0][0][:, 4, 4].tolist() == [200, 30, 30]
    assert torch.equal(from_folder[from_folder.samples.index((str(tmp_path / "out" / "7" / "0.png"), 1))][0],
                       from_npz[0][0])
    np.savez(tmp_path / "onehot.npz", x_train=x[..., 0], y_train=np.eye(3)[[2, 0, 1]])
    np.savez(tmp_path / "chw.npz", x_train=np.zeros((3, 3, 8, 8), dtype=np.uint8), y_train=np.arange(3))
    for name, fragment in (("onehot", "one label per image"), ("chw", "[N x H x W x C]")):
        assert_one_line_error(run_tool("export_dataset.py", tmp_path / f"{name}.npz", tmp_path / name), fragment)
        with pytest.raises(UsageError, match=re.escape(fragment)):
            load_npz_dataset(str(tmp_path / f"{name}.npz"), 8)


def test_export_a_builtin_dataset_as_the_folder_train_py_reads(tmp_path):
    from utils import ImageFolderDataset, make_shapes_dataset
    result = run_tool("export_dataset.py", "shapes", tmp_path / "shapes", "--image_size", "16", "--limit", "40")
    assert result.returncode == 0, result.stderr
    folder = ImageFolderDataset(str(tmp_path / "shapes"), 16)
    images, labels, names = make_shapes_dataset(image_size=16)
    assert folder.class_names == sorted(names) and len(folder) == 40
    # Image 0 lands in its class's folder, losslessly.
    first = [i for i, (path, _) in enumerate(folder.samples) if path.endswith(f"{names[labels[0]]}/00.png")]
    assert len(first) == 1 and torch.equal(folder[first[0]][0], images[0])


def test_resize_puts_transparent_pixels_on_white_as_the_loader_does(tmp_path):
    """Alpha, a palette's transparent index, or an L/RGB image's transparent colour: white in the resized
    copy, as utils.fit_image reads the original (training on either gives the same pixels)."""
    from utils import load_image
    src = tmp_path / "src"
    src.mkdir()
    grey = np.zeros((8, 8), dtype=np.uint8)
    grey[2:6, 2:6] = 100
    Image.fromarray(grey).save(src / "keyed.png", transparency=0)       # L with a transparent colour, 0
    icon = np.zeros((8, 8, 4), dtype=np.uint8)
    icon[2:6, 2:6] = [200, 30, 30, 255]
    Image.fromarray(icon, "RGBA").save(src / "icon.png")
    assert run_tool("resize_dataset.py", src, tmp_path / "out", "--size", 8, "--workers", 1).returncode == 0
    for name, channels in (("keyed.png", 1), ("icon.png", 3)):
        resized, original = load_image(tmp_path / "out" / name, 8, channels), load_image(src / name, 8, channels)
        assert torch.equal(resized, original) and resized[:, 0, 0].tolist() == [255] * channels
    # JPEG keeps no transparency: the white must be in the pixels themselves.
    assert run_tool("resize_dataset.py", src, tmp_path / "jpg", "--size", 8, "--workers", 1, "--format", "jpg").returncode == 0
    for name, channels in (("keyed.jpg", 1), ("icon.jpg", 3)):
        assert load_image(tmp_path / "jpg" / name, 8, channels)[:, 0, 0].min() > 240, name


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_dataset_tools_never_open_a_named_pipe_named_like_an_image(tmp_path):
    """Opening a FIFO to read waits for a writer forever: both tools hung on data/c/pipe.png. resize
    leaves it out and says so; clean reports it (the training loader would hang on it) and moves it."""
    data = tmp_path / "data"
    (data / "c").mkdir(parents=True)
    noise(12, 12, seed=1).save(data / "c" / "a.png")
    os.mkfifo(data / "c" / "pipe.png")
    r = run_tool("resize_dataset.py", data, tmp_path / "out", "--size", 8, "--workers", 1, timeout=20)
    assert r.returncode == 0, r.stderr
    assert "written:  1" in r.stdout and "not read: 1" in r.stdout and "c/pipe.png: not a regular file" in r.stdout
    assert sorted(snapshot(tmp_path / "out")) == ["c/a.png"]
    r = run_tool("clean_dataset.py", data, "--min_size", 0, "--move", timeout=20)
    assert r.returncode == 0, r.stderr
    assert "c/pipe.png  (not a regular file" in r.stdout and "corrupted  1" in r.stdout
    assert stat.S_ISFIFO(os.lstat(tmp_path / "data_rejected" / "corrupted" / "c" / "pipe.png").st_mode)
    assert sorted(os.listdir(data / "c")) == ["a.png"]


def test_dataset_tools_follow_linked_folders_as_training_does(tmp_path):
    """An image in a symbolic-linked subfolder is trained on (utils.list_images), so the tools that clean
    and resize a dataset see it too; a link back up the tree is walked once."""
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    noise(12, 12, seed=1).save(data / "cat" / "a.png")
    (tmp_path / "store").mkdir()
    noise(12, 12, seed=2).save(tmp_path / "store" / "b.png")
    os.symlink(tmp_path / "store", data / "cat" / "linked")
    os.symlink(data / "cat", tmp_path / "store" / "loop")
    r = run_tool("resize_dataset.py", data, tmp_path / "out", "--size", 8, "--workers", 1)
    assert r.returncode == 0 and (tmp_path / "out" / "cat" / "linked" / "b.png").is_file() and "written:  2" in r.stdout
    r = run_tool("clean_dataset.py", data, "--dry_run")
    assert r.returncode == 0 and "2 images" in r.stdout
