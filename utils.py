"""
utils.py: the plumbing every other file leans on, and nothing about diffusion.

    images and datasets   ImageFolderDataset (your own pictures), load_npz_dataset (MNIST-style
                          .npz files), make_shapes_dataset (the offline built-in),
                          load_builtin_dataset (torchvision: mnist, ...)
    checkpoints           save_checkpoint (atomic: temp file + rename), load_checkpoint
                          (weights_only=True, with one-line errors), link_checkpoint (the
                          newest of several), check_output_folder (writable, room to spare),
                          check_output_file (its kind of name, a folder that can be written)
    pictures              save_grid, save_gif, plot_loss
    small helpers         pick_device, seed_everything, peak_memory_mb, UsageError

Images travel through the project as uint8 tensors [C x H x W] in 0..255 until the training loop
turns a batch into floats in [-1, 1] (to_model_range); samples come back with from_model_range.
DDPM Sec. 3.3 scales data this way so that the prior N(0, I) and the data share one scale.
"""
import argparse
import copy
import os
import random
import re
import shutil
import sys
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm


class UsageError(Exception):
    """Bad input the user can fix (a wrong path, flag or file). Entry points print it as one line."""


def one_line_warning(message, category, filename, lineno, line=None):
    """Warnings as the scripts' other messages are: 'warning: ...' on one line, not Python's file, line
    number, class name and a line of source below."""
    return f"warning: {message}\n"


warnings.formatwarning = one_line_warning  # every script imports utils.py


def typed_flags(parser, argv=None):
    """The names of the flags given on the command line, whatever their values (train.py --resume
    --max_steps 10000 must win even though 10000 is the default): a copy of the parser without defaults
    leaves out every flag not given."""
    typed = copy.deepcopy(parser)
    for action in typed._actions:
        action.default = argparse.SUPPRESS
    return set(vars(typed.parse_args(argv)))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except None: those flags' help says what happens then."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------
# Device and seeds
# ---------------------------------------------------------------------------------------------

def tensors_to(obj, device):
    """Move every tensor attribute of obj to device, in place, and return obj: the .to() of the classes
    that hold their precomputed constants as plain tensor attributes (GaussianDiffusion, ColdDiffusion)."""
    for name, value in list(vars(obj).items()):
        if isinstance(value, torch.Tensor):
            setattr(obj, name, value.to(device))
    return obj


def pick_device(name="auto"):
    """'auto' picks CUDA, then Apple MPS, then CPU. Never assume a GPU is there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple MPS is not available on this machine; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name; use auto, cpu, cuda, cuda:1 or mps") from None


def reset_peak_memory(device):
    """Start peak_memory_mb's count afresh (train.py does so when training begins, so that loading the
    data does not count). On Linux, writing 5 to /proc/self/clear_refs resets the process's peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the count runs from the process's start
        pass


def peak_memory_mb(device):
    """The most memory this run has held since reset_peak_memory, in MiB: tensors allocated on a CUDA
    device, or else the whole process's peak resident memory (on CPU the tensors live there, beside
    Python and torch themselves)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:  # Linux: VmHWM, the peak resident set, in kB
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory instead of returning it to the operating system, so that
    the training loop stops paying the kernel for the same pages every step. Returns True if it could.

    Why: a training step allocates and frees the same large activation buffers (8-17 MiB each for a
    batch of 64 at 32x32) again and again. glibc serves blocks above its "mmap threshold" with fresh
    mmap() calls and unmaps them on free; the next step maps them again and the kernel zero-fills
    every page on first touch. On 2 CPU cores that was 20-30% of the time in the kernel (the peers'
    bench, ../shared/bench/README.md). mallopt() raises the mmap threshold to its largest value,
    32 MiB on 64-bit Linux, so those buffers come from the heap, and the trim threshold to 1 GiB,
    so that freed heap memory is not handed back either. It changes where memory comes from, never
    a number computed. Blocks above 32 MiB (large attention maps) still go to mmap; only another
    allocator, for example jemalloc via LD_PRELOAD (README, "Speed"), keeps those. No effect and
    False outside Linux with glibc. Call it once at start-up, before the big tensors exist."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


def cpu_has_fast_bf16():
    """True when the CPU multiplies bf16 matrices in hardware: Intel AMX (amx_bf16) or AVX-512 BF16
    (avx512_bf16), read from /proc/cpuinfo's flags. Without either, bf16 autocast on a CPU is emulated
    and usually slower than fp32, so --amp auto stays in fp32 there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_amp(requested, device):
    """--amp's setting -> "off", "bf16" or "fp16" for this device. auto: on CUDA bf16 where the GPU
    supports it, else fp16; on a CPU bf16 only with bf16 matrix hardware (cpu_has_fast_bf16), else
    off; elsewhere (Apple MPS) bf16. train.py and tools/benchmark.py decide it the same way."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "off"
    return "bf16"


def emulated_bf16_note(requested, amp, device):
    """A one-line note when --amp bf16 was asked for by name on a CPU without bf16 matrix hardware,
    where bf16 is emulated (README Speed: 13x slower than fp32 in training on an AMD EPYC); else None.
    --amp auto never picks it there, so only an explicit request can land on it."""
    if requested == "bf16" and amp == "bf16" and torch.device(device).type == "cpu" and not cpu_has_fast_bf16():
        return ("note: --amp bf16 on a CPU without bf16 matrix hardware (AMX or AVX-512 BF16): bf16 is "
                "emulated and several times slower than fp32 here; --amp auto (or off) keeps fp32")
    return None


class AutocastNetwork(torch.nn.Module):
    """A network called under autocast, for sampling (sample.py --amp, tools/sampler_sweep.py --amp): its
    convolutions and matrix products run in bf16 or fp16, and its output [B x C' x H x W] comes back in
    float32, so the diffusion arithmetic around it (DDPM eq. 11 and 15, DDIM eq. 12) stays in full
    precision. It holds the network as .network and has no weights of its own."""

    def __init__(self, network, dtype):
        super().__init__()
        self.network, self.dtype = network, dtype

    def forward(self, x, *args, **kwargs):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.network(x, *args, **kwargs).float()


def resolve_channels_last(requested, device, amp):
    """--channels_last's setting ("auto", "on" or "off") -> whether the network and its inputs use the
    NHWC memory layout (device: a torch.device or its name). auto: on for fp32 on a CPU, where oneDNN's
    convolutions are faster in NHWC at our small channel counts (README, Speed: +6-11% in training and
    +19% in sampling for the default model); off with bf16 autocast, where it was slower, and off on GPUs
    and MPS, where we have not measured it. The layout changes the order of floating-point sums, not the
    arithmetic."""
    if requested != "auto":
        return requested == "on"
    return torch.device(device).type == "cpu" and amp == "off"


def refuse_fp16_on_cpu(amp, device):
    """Sampling in fp16 autocast is for GPUs: a CPU's matrix hardware, where it has any, is bf16's."""
    if amp == "fp16" and torch.device(device).type == "cpu":
        raise UsageError("--amp fp16: CPUs multiply bf16, not fp16, in hardware; use --amp bf16 (or auto)")


def prepare_network(model, device, amp="off"):
    """A loaded network, ready to sample on device (sample.py, the tools): eval mode; NHWC where train.py
    would lay it out so (resolve_channels_last: fp32 on a CPU, faster convolutions there); under bf16/fp16
    autocast when amp ("off", "bf16" or "fp16", as resolve_amp gives it) asks (AutocastNetwork: the
    sampler's arithmetic stays fp32)."""
    refuse_fp16_on_cpu(amp, device)
    model = model.to(device).eval()
    if resolve_channels_last("auto", device, amp):
        model.to(memory_format=torch.channels_last)
    if amp != "off":
        model = AutocastNetwork(model, torch.float16 if amp == "fp16" else torch.bfloat16)
    return model


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_model_range(images_uint8):
    """uint8 [B x C x H x W] in 0..255 -> float in [-1, 1] (DDPM Sec. 3.3 data scaling)."""
    return images_uint8.float().div(127.5).sub(1.0)


def from_model_range(images):
    """float [B x C x H x W] in about [-1, 1] -> uint8 in 0..255, clamped (for saving)."""
    return images.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


# ---------------------------------------------------------------------------------------------
# Your own folder of images
# ---------------------------------------------------------------------------------------------

# Every extension Pillow can open (jpg, png, webp, bmp, tif, gif, ...), lower case.
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def is_image_file(path):
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder):
    """Every image file under folder (recursively, sorted, hidden files and folders skipped)."""
    found, seen = [], set()
    # followlinks: a class folder that gathers other folders by symbolic links keeps their images; each real
    # folder is walked once, so a link back up the tree cannot loop.
    for root, dirs, files in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            dirs[:] = []
            continue
        seen.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and is_image_file(f)]
    return found


def fit_image(img, image_size, channels):
    """A PIL image -> uint8 [C x S x S]: converted to RGB (channels=3) or L (channels=1), its shorter
    side resized to image_size and centre-cropped to a square. Every image source goes through this."""
    # Phone photos store their rotation as an EXIF tag: apply it, so the image is the one a viewer shows
    # (and the one tools/resize_dataset.py writes), not the sensor's sideways copy.
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit greyscale (16-bit PNG or TIFF, often scientific or medical images): Pillow's convert
        # clips every value above 255 to white, so scale 0..65535 down to 0..255 first (65535 / 257 =
        # 255), as tools/resize_dataset.py does. Float images have no standard range: clipped to 0..255.
        values = np.asarray(img, dtype=np.float64) / (1.0 if img.mode == "F" else 257.0)
        img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))  # mode "L"
    if "A" in img.getbands() or "transparency" in img.info:
        # Transparent pixels (icons, sprites, glyphs) go onto white, as a viewer shows them. Dropping the
        # alpha would keep whatever colour they happen to store: often black, so dark ink on a
        # transparent grayscale (LA) image would vanish into a black square.
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("RGB" if channels == 3 else "L")
    # ImageOps.fit = resize keeping the aspect ratio so the square is filled, then centre-crop.
    img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # [H x W x C] -> [C x H x W]


def load_image(path, image_size, channels):
    """Open one image file -> uint8 [C x S x S] (fit_image)."""
    with Image.open(path) as img:
        return fit_image(img, image_size, channels)


class ImageFolderDataset(torch.utils.data.Dataset):
    """A folder of your own images.

    data/cars/Audi_R8/001.jpg, data/cars/BMW_M3/002.png ...  -> class-conditional (labels = folders)
    data/faces/001.jpg, data/faces/002.jpg ...               -> unconditional (every label is 0)

    Items are (uint8 image [C x H x W], int label). Files Pillow cannot identify are skipped when
    the dataset is built; a file that fails later while decoding (a truncated JPEG, say) is
    skipped with a warning naming it, and a neighbouring image is returned in its place.
    """

    def __init__(self, folder, image_size, channels=None, flag="--dataset_path", reads_npz=False):
        # flag: the option that named the folder, so that every error below names it. reads_npz: the caller
        # (train.py) also takes an .npz file of arrays, so the errors may offer one.
        if os.path.isfile(folder) and folder.lower().endswith(".npz") and not reads_npz:
            raise UsageError(f"{flag} {folder}: an .npz file, but this reads a folder of images; write one with "
                             f"python tools/export_dataset.py {folder} <folder>")
        if os.path.isfile(folder):  # a single image, or an .npz misspelt (train.py reads *.npz as arrays)
            raise UsageError(f"{flag} {folder}: a file, not a folder; point it at the folder that holds the images "
                             "(class subfolders become labels)" + (", or at an .npz file of arrays" if reads_npz else ""))
        if not os.path.isdir(folder):
            raise UsageError(f"{flag} {folder}: no such folder; point it at a folder of images "
                             "(class subfolders become labels)"
                             + (", or at an existing .npz file" if reads_npz and os.path.splitext(folder)[1] else ""))
        subfolders = sorted(d for d in os.listdir(folder)
                            if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
        if subfolders and all(d.isdecimal() for d in subfolders):
            # Numbered classes (an exported .npz: 0, 1, ..., 11) in number order, as load_npz_dataset has
            # them, so label i is class i in both; as strings 10 and 11 would come before 2.
            subfolders.sort(key=int)
        per_class = [(d, list_images(os.path.join(folder, d))) for d in subfolders]
        per_class = [(d, files) for d, files in per_class if files]
        loose = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                 if not f.startswith(".") and is_image_file(f) and os.path.isfile(os.path.join(folder, f))]
        if per_class:
            if loose:
                warnings.warn(f"{folder}: {len(loose)} images sit beside the class subfolders and are ignored; "
                              "move them into a class folder to use them")
            self.class_names = [d for d, _ in per_class]
            candidates = [(path, label) for label, (_, files) in enumerate(per_class) for path in files]
        else:
            self.class_names = []
            candidates = [(path, 0) for path in loose]
        if not candidates:
            raise UsageError(f"{flag} {folder}: no image files found (looked for "
                             ".jpg/.png/.webp/... here and in its subfolders)")

        # Opening an image reads only its header, so checking every file is cheap and catches
        # files that are not images at all. Also learn whether any image has colour.
        self.samples, any_colour = [], False
        for path, label in candidates:
            mode = header_mode(path)
            if mode is not None:
                any_colour = any_colour or mode not in GREY_MODES
                self.samples.append((path, label))
        if not self.samples:
            raise UsageError(f"{flag} {folder}: none of the {len(candidates)} image files could be read; "
                             "check them with python tools/clean_dataset.py " + folder)
        present = sorted({label for _, label in self.samples})
        if self.class_names and len(present) < len(self.class_names):  # a class with no readable image
            gone = [name for i, name in enumerate(self.class_names) if i not in present]
            warnings.warn(f"{folder}: no readable image in class folder(s) {', '.join(gone)}; left out, so that "
                          "no label is trained on nothing")
            renumber = {old: new for new, old in enumerate(present)}
            self.class_names = [self.class_names[i] for i in present]
            self.samples = [(path, renumber[label]) for path, label in self.samples]
        self.channels = channels or (3 if any_colour else 1)
        self.image_size = image_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return decode_skipping_broken(self.samples, index, lambda path, label: (
            load_image(path, self.image_size, self.channels), label), name=lambda path, label: path)


GREY_MODES = ("L", "1", "I", "I;16", "I;16B", "I;16L", "F", "LA")  # Pillow modes without colour


def header_mode(path):
    """The image's Pillow mode ("L" for a palette of greys), read from its header only (cheap), or None
    with a warning naming the file when Pillow cannot read it (not an image, or a broken header): such
    files are left out, not fatal."""
    if not os.path.isfile(path):  # a named pipe named like an image: opening it would wait forever for a writer
        warnings.warn(f"skipping {path}: not a regular file (a named pipe, socket, device or broken link)")
        return None
    try:
        with Image.open(path) as img:
            # img.palette comes with the header (getpalette() would decode the whole image first)
            palette = img.palette if img.mode in ("P", "PA") else None
            values = list(palette.palette) if palette is not None and palette.mode == "RGB" else []
            if values and values[0::3] == values[1::3] == values[2::3]:
                return "L"  # a palette of greys (a grayscale GIF, say) has no colour
            return img.mode
    except (UnidentifiedImageError, OSError) as error:
        warnings.warn(f"skipping unreadable image {path}: {error}")
        return None


def decode_skipping_broken(entries, index, decode, name):
    """decode(*entries[index]); when a file fails only while decoding (a truncated JPEG, say), a warning
    names it (name(*entry)) and the next entry is served in its place, so one bad file cannot stop a run."""
    for attempt in range(len(entries)):
        entry = entries[(index + attempt) % len(entries)]
        try:
            return decode(*entry)
        except (OSError, ValueError, SyntaxError) as error:  # what Pillow raises on broken files
            warnings.warn(f"skipping image that failed to decode {name(*entry)}: {error}")
    raise UsageError(f"none of the dataset's {len(entries)} images could be decoded (the last tried: "
                     f"{name(*entry)}); check the folder with python tools/clean_dataset.py")


class PairedImageDataset(torch.utils.data.Dataset):
    """Two folders whose images pair up by name, for image-to-image models (cascade.py):

    data/photos/001.jpg  <->  data/sketches/001.png      (the extension may differ; subfolders too)

    Items are (target uint8 [C x S x S], input uint8 [C_in x S x S]). Targets without an input (or the
    reverse) are left out with a warning that counts them."""

    def __init__(self, target_folder, input_folder, image_size, channels=None, input_channels=None):
        for flag, folder in (("--dataset_path", target_folder), ("--cond_path", input_folder)):
            if not os.path.isdir(folder):
                raise UsageError(f"{flag} {folder}: no such folder; image-to-image needs a folder of targets "
                                 "(--dataset_path) and one of inputs with the same file names (--cond_path)")

        def by_name(folder):  # "sub/001.jpg" -> "sub/001"; the first of 001.jpg and 001.png, with a warning
            found = {}
            for path in list_images(folder):
                found.setdefault(os.path.splitext(os.path.relpath(path, folder))[0], []).append(path)
            several = [paths for paths in found.values() if len(paths) > 1]
            if several:
                warnings.warn(f"{folder}: {len(several)} names have several files ({', '.join(several[0])}); "
                              "only the first of each pairs up, so rename the others to use them")
            return {name: paths[0] for name, paths in found.items()}
        targets, inputs = by_name(target_folder), by_name(input_folder)
        names = sorted(set(targets) & set(inputs))
        for flag, folder, found in (("--dataset_path", target_folder, targets), ("--cond_path", input_folder, inputs)):
            if not found:
                raise UsageError(f"{flag} {folder}: no image files found (looked for .jpg/.png/.webp/... here and in "
                                 "its subfolders)")
        if not names:
            raise UsageError(f"--cond_path {input_folder}: none of its {len(inputs)} images has a partner with the "
                             f"same name in --dataset_path {target_folder} ({len(targets)} images)")
        unpaired = len(targets) + len(inputs) - 2 * len(names)
        if unpaired:
            warnings.warn(f"{unpaired} images have no partner of the same name in the other folder and are left out")
        # Both halves' headers, as ImageFolderDataset checks its files: a pair with an unreadable file is left out.
        self.pairs, target_modes, input_modes = [], [], []
        for name in names:
            modes = header_mode(targets[name]), header_mode(inputs[name])
            if None not in modes:
                self.pairs.append((targets[name], inputs[name]))
                target_modes.append(modes[0])
                input_modes.append(modes[1])
        if not self.pairs:
            raise UsageError(f"--dataset_path {target_folder}, --cond_path {input_folder}: no pair of images could "
                             "be read; check them with python tools/clean_dataset.py")
        colour = (lambda modes: 3 if any(mode not in GREY_MODES for mode in modes) else 1)
        self.channels = channels or colour(target_modes)
        self.input_channels = input_channels or colour(input_modes)
        self.image_size, self.class_names = image_size, []

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        def decode(target, source):
            return (load_image(target, self.image_size, self.channels),
                    load_image(source, self.image_size, self.input_channels))
        return decode_skipping_broken(self.pairs, index, decode, name=lambda target, source: f"{target} or {source}")


# ---------------------------------------------------------------------------------------------
# Built-in datasets
# ---------------------------------------------------------------------------------------------

SHAPE_NAMES = ["circle", "square", "triangle", "ring"]


def make_shapes_dataset(num_images=10000, image_size=32, seed=0):
    """The offline built-in dataset: one coloured shape (circle, square, triangle or ring) of random
    size, position and colour on a dark background with a gentle gradient. It needs no download,
    is made in a second, and is easy enough that a small model on a CPU learns it in minutes.

    Returns (uint8 images [N x 3 x S x S], int64 labels [N], class names)."""
    rng = np.random.default_rng(seed)
    n, s = num_images, image_size
    labels = rng.integers(0, len(SHAPE_NAMES), n)
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1)) * s          # centres [N x 1 x 1]
    radius = rng.uniform(0.15, 0.3, (n, 1, 1)) * s             # half-size of each shape
    colour = rng.uniform(0.35, 1.0, (n, 3, 1, 1))
    background_level = rng.uniform(0.0, 0.25, (n, 3, 1, 1))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5       # pixel centres [S x S]
    images = torch.empty(n, 3, s, s, dtype=torch.uint8)
    for start in range(0, n, 500):  # in chunks: the float64 temporaries of all N at once take gigabytes
        part = slice(start, start + 500)
        dy, dx = yy[None] - cy[part], xx[None] - cx[part]      # offsets [n x S x S]
        r = radius[part]
        masks = np.stack([
            dx ** 2 + dy ** 2 <= r ** 2,                                            # circle
            np.maximum(abs(dx), abs(dy)) <= r * 0.85,                               # square
            (dy <= r * 0.8) & (abs(dx) * 1.7 <= dy + r),                            # triangle (apex up)
            abs(np.sqrt(dx ** 2 + dy ** 2) - r * 0.8) <= r * 0.25,                  # ring
        ])[labels[part], np.arange(len(r))]                    # pick each image's shape: [n x S x S]
        background = background_level[part] * (0.6 + 0.4 * yy[None, None] / s)
        chunk = np.where(masks[:, None], colour[part], background)
        images[part] = torch.from_numpy((chunk * 255).round().astype(np.uint8))
    return images, torch.from_numpy(labels), list(SHAPE_NAMES)


def reorder_classes(dataset, names):
    """Number an ImageFolderDataset's or TensorImageDataset's classes in the order of names (the same
    names, in another order), relabelling every image by its class name."""
    new_index = torch.tensor([names.index(name) for name in dataset.class_names])   # old label -> new label
    if hasattr(dataset, "samples"):
        dataset.samples = [(path, int(new_index[label])) for path, label in dataset.samples]
    else:
        dataset.labels = new_index[dataset.labels]
    dataset.class_names = list(names)


class TensorImageDataset(torch.utils.data.Dataset):
    """uint8 images [N x C x H x W] and int labels [N] held in memory; items like ImageFolderDataset."""

    def __init__(self, images, labels, class_names):
        self.images, self.labels, self.class_names = images, labels, class_names
        self.channels, self.image_size = images.shape[1], images.shape[-1]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


def to_image_size(images, image_size):
    """uint8 images [N x H x W] or [N x H x W x C] (as NumPy and torchvision keep them) -> uint8
    [N x C x S x S]: 28x28 digits padded to 32 first (so the UNet can halve them 3 times, as usual),
    then resized (bilinear, antialiased) when S differs."""
    images = torch.as_tensor(np.asarray(images))
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # -> [N x C x H x W]
    if images.shape[-1] == 28:  # MNIST-style digits
        images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = torch.nn.functional.interpolate(images.float(), size=(image_size, image_size), mode="bilinear",
                                                 antialias=True, align_corners=False)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


def read_npz_arrays(path, split="train", flag=""):
    """The arrays x_<split> (uint8 [N x H x W] or [N x H x W x C]) and y_<split> [N] of an MNIST-style .npz
    file, checked, with one-line errors that start with flag (the option that named the file)."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag}{path}: no such file; pass an .npz with x_{split} and y_{split} arrays")
    try:
        with np.load(path) as data:
            images, labels = data[f"x_{split}"], data[f"y_{split}"]
    except Exception as error:  # a missing array, a truncated or non-zip file (BadZipFile, EOFError, zlib.error)
        raise UsageError(f"{flag}{path}: cannot read arrays x_{split} and y_{split} "
                         f"({type(error).__name__}: {error})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels) or len(images) == 0:
        raise UsageError(f"{flag}{path}: expected uint8 x_{split} [N x H x W (x C)] and N labels, got "
                         f"{images.dtype} {images.shape} and {labels.shape}")
    if images.ndim == 4 and images.shape[-1] not in (1, 2, 3, 4):  # [N x C x H x W] would read C as a width
        raise UsageError(f"{flag}{path}: x_{split} {images.shape} has {images.shape[-1]} channels last; store "
                         f"images as [N x H x W x C] with C = 1 or 3 (np.moveaxis(x, 1, -1) from [N x C x H x W])")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)                               # [N x 1] column of labels
    if labels.ndim != 1:  # one-hot [N x K] rows would each become a "label" value of its own
        raise UsageError(f"{flag}{path}: y_{split} {labels.shape} must hold one label per image, [N]; "
                         f"for one-hot labels store y.argmax(1)")
    return images, labels


def fit_images(images, image_size, channels=None, desc="fitting images"):
    """uint8 images [N x H x W] or [N x H x W x C] (NumPy) -> uint8 [N x C x S x S], each through
    fit_image exactly as an image file would be read: 28x28 digits are resized to 32, not padded.
    Arrays that are compared with image folders (an .npz, a peer's samples) must come this way.
    channels None: 3 for colour arrays (RGB, or RGBA put on white as fit_image does), else 1."""
    channels = channels or (3 if images.ndim == 4 and images.shape[-1] in (3, 4) else 1)
    return torch.stack([fit_image(Image.fromarray(image.squeeze()), image_size, channels)
                        for image in tqdm(images, desc=desc, leave=False, disable=len(images) < 5000)])


def load_npz_dataset(path, image_size, channels=None, split="train"):
    """An MNIST-style .npz file (uint8 x_train [N x H x W] or [N x H x W x C], integer y_train [N]) as a
    TensorImageDataset at image_size. The labels' distinct values, sorted, become the class names.
    Each image is resized exactly as an image file would be (fit_image), so training on the .npz and
    on its export to PNGs (tools/export_dataset.py) sees the same pixels, and a reference folder
    exported from it matches the training data (tools/evaluate.py)."""
    images, labels = read_npz_arrays(path, split, "--dataset_path ")
    values, indices = np.unique(labels, return_inverse=True)  # any label values -> 0 .. K-1
    images = fit_images(images, image_size, channels, desc=f"reading {os.path.basename(path)}")
    return TensorImageDataset(images, torch.as_tensor(indices.reshape(-1), dtype=torch.long),
                              [str(v) for v in values.tolist()])


def load_builtin_dataset(name, image_size, root="data", seed=0):
    """'shapes' is generated here; 'mnist', 'fashion_mnist', 'cifar10' come from torchvision and
    download into root/ the first time (only when you name them). Returns a TensorImageDataset
    resized to image_size (digits are padded from 28 to 32 first, as is usual, then resized)."""
    if name == "shapes":
        return TensorImageDataset(*make_shapes_dataset(image_size=image_size, seed=seed))
    import torchvision  # imported here: only the downloadable datasets need it
    constructors = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
                    "cifar10": torchvision.datasets.CIFAR10}
    if name not in constructors:
        raise UsageError(f"--dataset {name}: unknown; choose one of shapes, {', '.join(constructors)}")
    try:
        data = constructors[name](root=os.path.join(root, name), train=True, download=True)
    except Exception as error:  # no network, a proxy, a half-written file: all end the same way
        for folder, _, _ in sorted(os.walk(os.path.join(root, name)), reverse=True):  # deepest first
            if not os.listdir(folder):  # the empty folders the attempt made; never a file
                os.rmdir(folder)
        reason = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        raise UsageError(f"--dataset {name}: could not download it into {os.path.join(root, name)} ({reason[-1]}); "
                         "connect to the internet once, or use --dataset_path with a folder of images") from None
    return TensorImageDataset(to_image_size(data.data, image_size), torch.as_tensor(np.asarray(data.targets)),
                              plain_class_names(data.classes))


def plain_class_names(names):
    """torchvision's class names as a user types them and a file name can hold: MNIST's '3 - three' is '3'
    (as in an .npz, so sample.py --class_name 3 finds it), and Fashion-MNIST's 'T-shirt/top' is
    'T-shirt_top' (a / in a name would make a subfolder of sample.py --individual_dir's files and of
    tools/export_dataset.py's class folders)."""
    return [re.sub(r"^(\d+) - .*$", r"\1", str(name)).replace("/", "_") for name in names]


# ---------------------------------------------------------------------------------------------
# Checkpoints: written atomically, read safely
# ---------------------------------------------------------------------------------------------

def save_checkpoint(state, path):
    """Write state to path so that a crash at any moment leaves either the old file or the new one,
    never half a file: write a temporary file beside it, flush it to disk, rename it (atomic), then
    flush the folder, which holds the rename (else a power cut can undo it)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        sync_folder(folder)
    except BaseException:  # a full disk, a second Ctrl-C: drop the partial file, keep the old checkpoint
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def sync_folder(folder):
    """fsync a folder, so that a rename inside it survives a power cut; skipped where folders cannot be
    opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(descriptor)


def link_checkpoint(target, path):
    """Make path name the same file as target (a hard link: no second copy on disk), atomically, so
    that checkpoints/<run>.pt always names the newest step-numbered checkpoint. Where the file system
    has no hard links, a copy (written atomically too)."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        try:
            os.link(target, temporary)
        except OSError:
            shutil.copyfile(target, temporary)
            with open(temporary, "rb+") as f:  # the copy's bytes on disk before the rename points at them
                os.fsync(f.fileno())
        os.replace(temporary, path)
        sync_folder(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def run_files(folder, run_name, temporary=False):
    """This run's own checkpoint files in folder: <run>.pt, <run>_ema.pt and <run>[_ema]_stepNNNNNNN.pt
    (--keep_last), or with temporary=True the .tmp<pid> files a killed write left of them. Never another
    run's, such as <run>_sr's or <run>_classifier's, which may share the folder (and be saving right now)."""
    own = re.compile(re.escape(run_name) + r"(_ema)?(_step\d+)?\.pt" + (r"\.tmp\d+" if temporary else ""))
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if own.fullmatch(name)] \
        if os.path.isdir(folder) else []


def remove_stale_temporaries(folder, run_name):
    """Temporary files that a killed process (kill -9 during a write) left behind; never a checkpoint."""
    for path in run_files(folder, run_name, temporary=True):
        os.remove(path)


def check_output_folder(folder, flag, bytes_needed=0):
    """Fail at start-up, not after an hour of training, when a folder we will write to cannot be
    created or written, or has too little free space for bytes_needed."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the nearest part of the path that is there already
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {folder}: cannot write there ({existing} is a file, so no folder can be made "
                         "there); pick another path")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"{flag} {folder}: cannot write there ({error.strerror or error}); "
                         "pick a folder you can write to") from None
    free = shutil.disk_usage(folder).free
    if free < bytes_needed:
        raise UsageError(f"{flag} {folder}: only {free / 2**20:.0f} MB free, but the checkpoints need about "
                         f"{bytes_needed / 2**20:.0f} MB; free some space or pick another folder")


def check_output_file(path, flag, suffixes=None):
    """Fail at start-up, not after minutes of sampling or scoring, when a file we will write cannot be:
    a name without one of the suffixes (such as (".png", ".jpg") for an image, whose format follows the
    name), an existing folder of that name, or a folder that cannot be written."""
    if suffixes and os.path.splitext(path)[1].lower() not in suffixes:
        kinds = suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"
        raise UsageError(f"{flag} {path}: name a {kinds} file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: a folder of that name is there; name a file")
    check_output_folder(os.path.dirname(path) or ".", f"{flag} {path}: the folder")


def out_of_memory(error, fix):
    """A one-line message for an error that says the device ran out of memory (a CUDA or MPS
    OutOfMemoryError, or the CPU allocator's failure), ending in fix (the flags that help), else None:
    the scripts print it instead of a traceback."""
    text = str(error)
    kinds = tuple(kind for kind in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if kind)
    if not (isinstance(error, kinds) or "out of memory" in text.lower() or "can't allocate memory" in text):
        return None
    first = text.strip().splitlines()[0][:160] if text.strip() else type(error).__name__
    return f"out of memory ({first}); {fix}"


def load_checkpoint(path, required=("model_config", "diffusion_config"), flag="--ckpt", task=None,
                    written_by="train.py"):
    """Load a checkpoint written by train.py (or written_by, another script): CPU first, weights_only=True
    (no arbitrary code runs), with a one-line UsageError for a missing file, a file that is not a
    checkpoint, or missing keys. flag: the option that named the file, so that the error names it (--ckpt,
    --classifier_ckpt ...). task: the train.py --task the caller can use ("diffusion": models that draw
    from noise alone; a super-resolution or image-to-image model needs input images that only sample.py
    gives it)."""
    if not os.path.isfile(path):
        what = "a folder, not a checkpoint file" if os.path.isdir(path) else "no such file"
        raise UsageError(f"{flag} {path}: {what}; train one first (python {written_by} ...) or check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"{flag} {path}: not a checkpoint this repository can read ({type(error).__name__}); "
                         f"pass a .pt file written by {written_by}") from None
    check_keys(state, path, required, flag)
    if task is not None and state.get("task", "diffusion") != task:
        raise UsageError(f"{flag} {path}: a --task {state['task']} model; this needs a --task {task} one"
                         + (f" (sample it with python sample.py --ckpt {path} --cond_images ...)"
                            if state["task"] in ("super_resolution", "image_to_image") else ""))
    return state


def check_keys(state, path, required, flag="--ckpt"):
    """load_checkpoint's check that a loaded checkpoint holds the keys its user needs, on its own, for a
    caller that loaded the file once and learns only afterwards what it needs. Returns state."""
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if "diffusion_config" in missing and isinstance(state, dict) and "cold_config" in state:
        raise UsageError(f"{flag} {path}: a Cold Diffusion model (cold.py), and this needs a Gaussian diffusion "
                         f"checkpoint; sample it with python sample.py --ckpt {path}")
    if missing:
        raise UsageError(f"{flag} {path}: not a checkpoint written by train.py (it lacks {', '.join(missing)})")
    bad_config = next((key for key in required if key.endswith("_config") and not isinstance(state[key], dict)), None)
    if bad_config:  # a hand-edited file: every *_config is a dict of plain settings
        raise UsageError(f"{flag} {path}: its {bad_config} is a {type(state[bad_config]).__name__}, not a dict of "
                         "settings; the file was edited or written by different code")
    return state


def load_weights(module, state_dict, path, flag="--ckpt"):
    """Strict load (every key must match) with a one-line error that says what does not match."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UsageError(f"{flag} {path}: its weights do not match the model its own config describes "
                         f"({first[:200]}); the file was edited or written by different code") from None


# ---------------------------------------------------------------------------------------------
# Pictures: grids, GIFs, loss plots
# ---------------------------------------------------------------------------------------------

def make_grid_image(images_uint8, nrow=None, padding=2):
    """uint8 [B x C x H x W] -> one PIL image with the pictures in a grid (nrow per row)."""
    from torchvision.utils import make_grid
    nrow = nrow or max(1, int(round(len(images_uint8) ** 0.5)))
    grid = make_grid(images_uint8, nrow=nrow, padding=padding, pad_value=255)  # [3 x H' x W'], uint8
    array = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if images_uint8.shape[1] == 1 else array)


def stacked_rows(groups, nrow):
    """Interleave equally long uint8 batches [N x C x S x S] as rows of up to nrow images: group 1's
    first nrow, group 2's first nrow, ..., then the next nrow of each. A short last row is padded with
    white so that the images of one column stay aligned."""
    rows = []
    for i in range(0, len(groups[0]), nrow):
        for group in groups:
            part = group[i:i + nrow]
            rows.append(torch.cat([part, torch.full((nrow - len(part), *part.shape[1:]), 255, dtype=torch.uint8)]))
    return torch.cat(rows)


def resize_uint8(images, size, mode):
    """uint8 [N x C x s x s] -> uint8 [N x C x size x size], nearest or bicubic (antialiased when shrinking)."""
    if mode == "nearest":
        out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="nearest")
    else:
        out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic",
                                              align_corners=False, antialias=size < images.shape[-1])
    return out.round().clamp(0, 255).to(torch.uint8)


def save_image(image_uint8, path):
    """One uint8 [C x H x W] image -> a PNG at path (greyscale for one channel)."""
    make_grid_image(image_uint8[None], nrow=1, padding=0).save(path)


def save_grid(images_uint8, path, nrow=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    make_grid_image(images_uint8, nrow).save(path)


def save_gif(frames, path, duration_ms=80, hold_last_ms=1500):
    """frames: list of PIL images (one per step of the reverse process) -> an animated GIF that
    lingers on the last frame so the final sample can be seen."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)


def write_json(path, result):
    """A tool's results as indented JSON (folders created)."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def check_csv_table(path, fields, flag="--csv"):
    """Can rows with these columns be appended to path? A tool calls this before its (long) work, so that
    a wrong --csv fails at once rather than after the measurements, which would then be lost. Returns
    True when the file is new or empty (it gets the header first)."""
    import csv
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: a folder; name a .csv file")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return True
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if header != list(fields):  # rows of another layout under its header would land in the wrong columns
        raise UsageError(f"{flag} {path}: its columns are not the ones written now (a table from an older "
                         "version, or from another tool); give a new file name")
    return False


def append_csv_rows(path, fields, rows):
    """Append dict rows to a CSV file, writing the header first if the file is new (the sweep tools
    keep adding to one table); an existing file must have the same columns (check_csv_table)."""
    import csv
    new_file = check_csv_table(path, fields)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def plot_loss(steps, losses, path, by_level=None):
    """The loss history as a PNG (raw loss faint, a moving average on top). by_level: optional
    {label: [loss per step, NaN where absent]}, e.g. the loss at each quarter of the t range, drawn
    as moving averages on the same axes."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    window = max(10, len(losses) // 50)

    def smoothed(values):  # a moving average that skips missing (NaN) entries
        values = np.asarray(values, dtype=float)
        present = np.isfinite(values)
        sums = np.convolve(np.where(present, values, 0.0), np.ones(window), mode="valid")
        counts = np.convolve(present.astype(float), np.ones(window), mode="valid")
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums / counts

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, alpha=0.3, lw=0.8, label="loss")
    if len(losses) >= 20:
        ax.plot(steps[window - 1:], smoothed(losses), lw=1.5, label=f"moving average ({window})")
        for label, values in (by_level or {}).items():
            ax.plot(steps[window - 1:], smoothed(values), lw=1.0, ls="--", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
