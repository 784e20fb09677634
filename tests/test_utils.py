"""Datasets, checkpoints and pictures: the plumbing must not lose data or hide bad input."""
import mmap
import os

import numpy as np
import pytest
import torch
from PIL import Image

import utils
from conftest import make_image_folder
from utils import (ImageFolderDataset, UsageError, from_model_range, load_builtin_dataset, load_checkpoint,
                   make_shapes_dataset, save_checkpoint, to_model_range)


def test_folder_dataset_labels_sizes_and_modes(tmp_path):
    folder = make_image_folder(tmp_path / "pets")
    data = ImageFolderDataset(folder, image_size=16)
    assert data.class_names == ["cat", "dog"] and len(data) == 12 and data.channels == 3
    image, label = data[7]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == 1
    gray = ImageFolderDataset(folder, image_size=8, channels=1)
    assert gray[0][0].shape == (1, 8, 8)


def test_16_bit_greyscale_images_are_scaled_not_clipped_to_white(tmp_path):
    """A 16-bit PNG holds 0..65535; Pillow's convert("L") alone would turn everything above 255 white."""
    (tmp_path / "scans" / "a").mkdir(parents=True)
    levels = np.repeat(np.array([0, 4000, 32768, 65535], dtype=np.uint16), 2)      # 8 columns
    Image.fromarray(np.tile(levels, (8, 1))).save(tmp_path / "scans" / "a" / "x.png")
    assert Image.open(tmp_path / "scans" / "a" / "x.png").mode == "I;16"
    dataset = ImageFolderDataset(str(tmp_path / "scans"), 8)
    x, _ = dataset[0]
    assert dataset.channels == 1
    assert x[0, 0].tolist() == np.round(levels / 257).astype(int).tolist()  # 0 16 128 255, each twice


def test_images_are_read_as_a_viewer_shows_them_upright_and_on_white(tmp_path):
    """EXIF orientation is applied (a phone photo tagged 'rotate 90' is not read lying on its side), and
    transparent pixels become white, not the colour they happen to store (often black)."""
    from utils import load_image
    sideways = np.zeros((20, 40), dtype=np.uint8)
    sideways[:, 20:] = 255                                   # stored: black left half, white right half
    exif = Image.Exif()
    exif[0x0112] = 6                                         # Orientation: rotate 90 clockwise to view
    Image.fromarray(sideways).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = load_image(tmp_path / "phone.jpg", 8, 1)[0].float()  # viewed: black top half, white bottom
    assert upright[:3].mean() < 20 and upright[5:].mean() > 235
    ink = np.zeros((8, 8, 2), dtype=np.uint8)
    ink[..., 0], ink[2:6, 2:6, 1] = 20, 255                  # dark grey everywhere, opaque only in the centre
    Image.fromarray(ink, "LA").save(tmp_path / "glyph.png")
    glyph = load_image(tmp_path / "glyph.png", 8, 1)[0]
    assert glyph[0].tolist() == [255] * 8 and glyph[4].tolist() == [255, 255, 20, 20, 20, 20, 255, 255]
    icon = np.zeros((8, 8, 4), dtype=np.uint8)               # transparent black, with one opaque red pixel
    icon[4, 4] = [255, 0, 0, 255]
    Image.fromarray(icon, "RGBA").save(tmp_path / "icon.png")
    assert load_image(tmp_path / "icon.png", 8, 3)[:, 0, 0].tolist() == [255, 255, 255]
    assert load_image(tmp_path / "icon.png", 8, 3)[:, 4, 4].tolist() == [255, 0, 0]


def test_folder_edge_cases_keep_every_readable_image_and_every_label_meaningful(tmp_path):
    """A linked subfolder inside a class is read (a link loop is walked once); a class whose files are all
    unreadable is left out and the labels renumbered; a palette of greys counts as grayscale."""
    root = tmp_path / "data"
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
    Image.new("L", (8, 8), 10).save(root / "a" / "1.png")
    (root / "b" / "1.png").write_bytes(b"not an image")
    grey_gif = Image.new("P", (8, 8), 1)
    grey_gif.putpalette([0, 0, 0, 128, 128, 128, 255, 255, 255])
    grey_gif.save(root / "c" / "1.gif")
    (tmp_path / "more").mkdir()
    Image.new("L", (8, 8), 200).save(tmp_path / "more" / "2.png")
    os.symlink(tmp_path / "more", root / "c" / "batch2")
    os.symlink(root / "c", root / "c" / "batch2" / "loop")                # a link back up the tree
    with pytest.warns(UserWarning) as caught:
        dataset = ImageFolderDataset(str(root), 8)
    assert any("class folder(s) b; left out" in str(w.message) for w in caught)
    assert dataset.class_names == ["a", "c"] and dataset.channels == 1
    assert sorted((os.path.basename(p), label) for p, label in dataset.samples) == [("1.gif", 1), ("1.png", 0),
                                                                                    ("2.png", 1)]


def test_paired_folders_warn_about_two_files_of_one_name(tmp_path):
    from utils import PairedImageDataset
    for folder in ("targets", "inputs"):
        (tmp_path / folder).mkdir()
    Image.new("L", (8, 8), 10).save(tmp_path / "targets" / "001.jpg")
    Image.new("L", (8, 8), 20).save(tmp_path / "targets" / "001.png")
    Image.new("L", (8, 8), 30).save(tmp_path / "inputs" / "001.png")
    with pytest.warns(UserWarning, match="1 names have several files"):
        data = PairedImageDataset(str(tmp_path / "targets"), str(tmp_path / "inputs"), 8)
    assert [os.path.basename(t) for t, _ in data.pairs] == ["001.jpg"]


def test_resize_keeps_aspect_and_crops_the_centre(tmp_path):
    """An 80x20 image, black with a white middle half, becomes all white at 8x8: the shorter side
    is resized to 8 (the width to 32) and only the centre 8 columns are kept."""
    image = Image.new("RGB", (80, 20), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 60, 20))
    (tmp_path / "one").mkdir()
    image.save(tmp_path / "one" / "wide.png")
    x, label = ImageFolderDataset(tmp_path / "one", image_size=8)[0]
    assert label == 0 and x.min().item() >= 250


def test_unreadable_and_truncated_files_are_skipped_with_a_warning_naming_them(tmp_path):
    folder = make_image_folder(tmp_path / "pets", per_class=2)
    (folder / "cat" / "junk.png").write_bytes(b"not an image")
    good = folder / "dog" / "big.jpg"
    noise = torch.randint(0, 256, (128, 128, 3), dtype=torch.uint8).numpy()
    Image.fromarray(noise).save(good, quality=95)  # big enough that half the file still holds the header
    data = good.read_bytes()
    (folder / "dog" / "cut.jpg").write_bytes(data[: len(data) // 2])  # header fine, pixels missing
    with pytest.warns(UserWarning, match="junk.png"):
        dataset = ImageFolderDataset(folder, image_size=16)
    assert len(dataset) == 6  # 4 good + big.jpg + cut.jpg (its header still reads)
    index = [p for p, _ in dataset.samples].index(str(folder / "dog" / "cut.jpg"))
    with pytest.warns(UserWarning, match="cut.jpg"):
        image, label = dataset[index]
    assert image.shape == (3, 16, 16)  # a neighbour came back instead


def test_loose_images_beside_class_folders_are_ignored_with_a_warning(tmp_path):
    folder = make_image_folder(tmp_path / "pets", per_class=1)
    Image.new("RGB", (8, 8)).save(folder / "stray.png")
    with pytest.warns(UserWarning, match="ignored"):
        assert len(ImageFolderDataset(folder, image_size=8)) == 2


def test_shapes_dataset_is_deterministic_and_labelled():
    images, labels, names = make_shapes_dataset(num_images=200, image_size=24, seed=3)
    again, _, _ = make_shapes_dataset(num_images=200, image_size=24, seed=3)
    assert images.shape == (200, 3, 24, 24) and images.dtype == torch.uint8 and torch.equal(images, again)
    assert set(labels.tolist()) == {0, 1, 2, 3} and names == ["circle", "square", "triangle", "ring"]
    # Each image has a bright shape on a dark background.
    assert (images.amax(dim=(1, 2, 3)) > 80).all() and (images.amin(dim=(1, 2, 3)) < 70).all()


def test_downloadable_dataset_offline_is_one_clear_error(monkeypatch, tmp_path):
    import torchvision

    def offline(root, **kwargs):  # as torchvision fails: empty folders made, a message of several lines
        os.makedirs(os.path.join(root, "MNIST", "raw"))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://example/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(UsageError, match="--dataset mnist: could not download") as caught:
        load_builtin_dataset("mnist", 32, root=str(tmp_path))
    assert "\n" not in str(caught.value) and "Name or service not known" in str(caught.value)
    assert not (tmp_path / "mnist").exists()  # no empty folders left behind
    with pytest.raises(UsageError, match="--dataset imagenet: unknown"):
        load_builtin_dataset("imagenet", 32)


def test_model_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    scaled = to_model_range(x)
    assert scaled.min().item() == -1.0 and scaled.max().item() == 1.0
    assert torch.equal(from_model_range(scaled), x)
    assert from_model_range(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """If writing fails half-way (a crash, a full disk), the previous checkpoint is untouched."""
    path = tmp_path / "run.pt"
    save_checkpoint({"step": 1, "model_config": {}, "diffusion_config": {}}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(utils.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(str(path))["step"] == 1
    assert os.listdir(tmp_path) == ["run.pt"]  # the partial temporary file was removed


def test_checkpoint_write_flushes_the_file_then_the_folder_that_holds_the_rename(tmp_path, monkeypatch):
    """Durable, not only atomic: the new file's bytes reach the disk before the rename, and the folder
    (which records the rename) after it, for plain saves and for --keep_last's links (or copies)."""
    import stat
    synced, real_fsync = [], os.fsync

    def recording_fsync(descriptor):
        synced.append("folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real_fsync(descriptor)
    monkeypatch.setattr(utils.os, "fsync", recording_fsync)
    save_checkpoint({"step": 1}, tmp_path / "run_step0000001.pt")
    assert synced == ["file", "folder"]
    synced.clear()
    utils.link_checkpoint(str(tmp_path / "run_step0000001.pt"), str(tmp_path / "run.pt"))
    assert synced == ["folder"]  # a hard link: no new bytes, only the folder's entry
    synced.clear()
    monkeypatch.setattr(utils.os, "link", lambda *a: (_ for _ in ()).throw(OSError("no hard links here")))
    utils.link_checkpoint(str(tmp_path / "run_step0000001.pt"), str(tmp_path / "run_copy.pt"))
    assert synced == ["file", "folder"]  # the copy's bytes, then the rename
    assert load_checkpoint(str(tmp_path / "run_copy.pt"), required=())["step"] == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resetting the peak needs Linux")
def test_peak_memory_counts_from_the_last_reset():
    from utils import peak_memory_mb, reset_peak_memory
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory_mb(cpu)
    # 200 MiB of fresh pages straight from the OS, each touched: a tensor could reuse memory that
    # earlier tests freed and glibc kept (utils.keep_freed_memory), which would not raise the peak.
    block = mmap.mmap(-1, 200 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    assert peak_memory_mb(cpu) >= before + 190
    block.close()  # handed back to the OS at once
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < before + 100  # the freed block no longer counts


def test_keep_freed_memory_sets_glibcs_thresholds():
    """utils.keep_freed_memory: mallopt accepts the largest mmap threshold (32 MiB) and the trim threshold, on
    Linux with glibc (where train.py's speed-up applies); elsewhere it reports that it did nothing."""
    import platform
    import sys
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert utils.keep_freed_memory() is expected


def test_resolve_channels_last_is_on_for_fp32_on_a_cpu_only_unless_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert utils.resolve_channels_last("auto", cpu, "off") is True and utils.resolve_channels_last("auto", "cpu", "off")
    assert [utils.resolve_channels_last("auto", cpu, amp) for amp in ("bf16", "fp16")] == [False, False]
    assert [utils.resolve_channels_last("auto", device, "off") for device in (cuda, torch.device("mps"))] == [False] * 2
    assert [utils.resolve_channels_last(mode, d, "bf16") for mode in ("on", "off") for d in (cpu, cuda)] == [
        True, True, False, False]


def test_prepare_network_lays_out_and_autocasts_as_asked_and_returns_float32():
    """Sampling's network: NHWC for fp32 on a CPU; with bf16 its convolutions run in bf16 (AutocastNetwork)
    while its output comes back in float32, close to the fp32 network's, and the weights are untouched."""
    from conftest import randomise_zero_inits
    from model import build_model
    config = dict(image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[4])
    torch.manual_seed(0)
    model = randomise_zero_inits(build_model(config))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 9])
    fp32 = utils.prepare_network(model, "cpu", "off")
    assert fp32 is model and not model.training
    assert model.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    expected = fp32(x, t)
    model.to(memory_format=torch.contiguous_format)
    bf16 = utils.prepare_network(model, "cpu", "bf16")
    assert isinstance(bf16, utils.AutocastNetwork) and bf16.network is model
    assert model.input_conv.weight.is_contiguous()  # bf16 stays NCHW (resolve_channels_last)
    conv_dtypes = []
    model.input_conv.register_forward_hook(lambda module, inputs, output: conv_dtypes.append(output.dtype))
    out = bf16(x, t)
    assert conv_dtypes == [torch.bfloat16] and out.dtype == torch.float32 and out.shape == expected.shape
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 keeps about 3 significant digits
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_resolve_amp_passes_explicit_settings_through_and_decides_auto_by_hardware():
    """--amp auto on a CPU: bf16 only where the CPU has bf16 matrix hardware (else fp32, "off"); an explicit
    setting is kept as given, on any device."""
    cpu = torch.device("cpu")
    assert utils.resolve_amp("auto", cpu) == ("bf16" if utils.cpu_has_fast_bf16() else "off")
    assert [utils.resolve_amp(mode, cpu) for mode in ("off", "bf16", "fp16")] == ["off", "bf16", "fp16"]
    assert utils.resolve_amp("auto", torch.device("mps")) == "bf16"


def test_emulated_bf16_note_only_for_bf16_asked_by_name_on_a_cpu_without_bf16_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: False)
    note = utils.emulated_bf16_note("bf16", "bf16", cpu)
    assert note.startswith("note: --amp bf16") and "emulated" in note and "--amp auto" in note
    assert utils.emulated_bf16_note("auto", utils.resolve_amp("auto", cpu), cpu) is None  # auto picks fp32 there
    assert utils.emulated_bf16_note("off", "off", cpu) is None
    assert utils.emulated_bf16_note("bf16", "bf16", torch.device("cuda")) is None
    monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: True)
    assert utils.emulated_bf16_note("bf16", "bf16", cpu) is None


def test_stacked_rows_interleave_groups_and_pad_the_short_last_row_with_white():
    a = torch.full((3, 1, 2, 2), 10, dtype=torch.uint8)
    b = torch.full((3, 1, 2, 2), 20, dtype=torch.uint8)
    rows = utils.stacked_rows([a, b], nrow=2)
    # rows: a[0:2], b[0:2], a[2] + white, b[2] + white
    assert rows.shape == (8, 1, 2, 2)
    assert [int(image.max()) for image in rows] == [10, 10, 20, 20, 10, 255, 20, 255]


def test_resize_uint8_keeps_uint8_and_nearest_repeats_pixels():
    image = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)       # [1 x 1 x 2 x 2]
    big = utils.resize_uint8(image, 4, "nearest")
    assert big.dtype == torch.uint8 and big.shape == (1, 1, 4, 4)
    assert torch.equal(big[0, 0, :2, :2], torch.zeros(2, 2, dtype=torch.uint8))   # each pixel -> a 2x2 block
    assert torch.equal(big[0, 0, 2:, 2:], torch.full((2, 2), 64, dtype=torch.uint8))
    flat = torch.full((1, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(utils.resize_uint8(flat, 4, "bicubic"), torch.full((1, 3, 4, 4), 77, dtype=torch.uint8))


def test_append_csv_rows_writes_one_header_and_refuses_a_file_of_other_columns(tmp_path):
    path = tmp_path / "table.csv"
    utils.append_csv_rows(str(path), ["a", "b"], [{"a": 1, "b": 2}])
    utils.append_csv_rows(str(path), ["a", "b"], [{"a": 3, "b": 4}])
    assert path.read_text().splitlines() == ["a,b", "1,2", "3,4"]
    empty = tmp_path / "empty.csv"
    empty.write_text("")  # e.g. left by an interrupted run: it gets its header like a new file
    utils.append_csv_rows(str(empty), ["a", "b"], [{"a": 5, "b": 6}])
    assert empty.read_text().splitlines() == ["a,b", "5,6"]
    # Rows of another layout under this header would land in the wrong columns: refused, file untouched.
    with pytest.raises(UsageError, match="table.csv: its columns are not the ones written now"):
        utils.append_csv_rows(str(path), ["a", "c", "b"], [{"a": 7, "c": 8, "b": 9}])
    assert path.read_text().splitlines() == ["a,b", "1,2", "3,4"]
    with pytest.raises(UsageError, match="a folder; name a .csv file"):
        utils.check_csv_table(str(tmp_path), ["a", "b"])


def test_start_up_clean_up_removes_only_this_runs_leftover_temporaries(tmp_path):
    """A kill -9 mid-write leaves <checkpoint>.tmp<pid>; the next start of the same run removes its own.
    Runs named after one dataset share a folder (cars, cars_sr, cars_classifier): one run's start must not
    delete a file another is writing right now, and never a checkpoint."""
    from utils import remove_stale_temporaries
    mine = ["cars.pt.tmp12", "cars_ema.pt.tmp12", "cars_step0000500.pt.tmp7", "cars_ema_step0000500.pt.tmp7"]
    others = ["cars_sr.pt.tmp99", "cars_sr_ema.pt.tmp99", "cars_classifier.pt.tmp5", "cars.pt", "cars_ema.pt",
              "cars_step0000500.pt", "carsick.pt.tmp3", "notes.txt"]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"x")
    remove_stale_temporaries(str(tmp_path), "cars")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


def test_warnings_print_as_one_line_like_the_other_messages():
    import warnings
    assert warnings.formatwarning("skipping unreadable image x.png", UserWarning, "utils.py", 3) == \
        "warning: skipping unreadable image x.png\n"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_named_like_an_image_is_skipped_not_waited_on(tmp_path):
    """Opening a FIFO to read it waits for a writer forever: the loader checks the entry is a regular file."""
    from conftest import time_limit
    make_image_folder(tmp_path / "pets")
    os.mkfifo(tmp_path / "pets" / "cat" / "pipe.png")
    with time_limit(20), pytest.warns(UserWarning, match="pipe.png: not a regular file"):
        dataset = ImageFolderDataset(str(tmp_path / "pets"), 16)
    assert len(dataset) == 12 and not any(path.endswith("pipe.png") for path, _ in dataset.samples)
