"""
Resize a folder of images to square size x size images, once, ahead of training.

Diffusion models here train on small square images (32x32, 64x64, ...). Decoding a
4000x3000 photo and shrinking it every epoch wastes most of the data-loading time, so
we do it once: every image is scaled (Lanczos, i.e. antialiased) so that its shorter
side is --size, then centre-cropped to --size x --size, and written to DST_DIR with the
same relative folder tree as SRC_DIR (so class subfolders like cat/ and dog/ survive).

Usage examples:

    # 64x64 copies of a dataset, keeping each file's name and format
    python tools/resize_dataset.py data/flowers data/flowers64 --size 64

    # everything as PNG (lossless), 4 worker processes
    python tools/resize_dataset.py data/flowers data/flowers32 --size 32 --format png --workers 4

    # see what would happen without writing anything
    python tools/resize_dataset.py data/flowers data/flowers64 --size 64 --dry_run

    # grayscale JPEGs at quality 90, replacing files written by an earlier run
    python tools/resize_dataset.py data/mnist_big data/mnist28 --size 28 --mode L \
        --format jpg --quality 90 --overwrite

Notes:
- An "image" is any file whose extension Pillow can open (searched recursively).
  Hidden files and folders (names starting with '.') are skipped.
- Images smaller than --size are upscaled (and counted in the summary); run
  tools/clean_dataset.py --min_size first if you would rather drop them.
- Files that cannot be read are not written and are listed in the summary; nothing
  else happens to them. Nothing in SRC_DIR is ever changed or deleted.
- Existing output files are skipped unless --overwrite is given, so an interrupted
  run can simply be started again. Each file is written to a hidden temp file and renamed
  into place; temp files left by a killed run are removed when the next run starts.

This script is deliberately self-contained (standard library, numpy, pillow, tqdm only)
so it works before the rest of the repository is set up.
"""

import argparse
import os
import stat
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

# -----------------------------------------------------------------------------
# finding images


def image_extensions():
    """Lowercase extensions ('.png', '.jpg', ...) that Pillow can actually open.
    registered_extensions() also lists save-only formats (e.g. .pdf), hence the filter."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def is_special_file(path):
    """True for a named pipe (FIFO), socket or device, after following links: opening one to
    read it can wait forever for a writer, so the tools must never open it. A dangling link or
    an entry we may not stat counts as a file: reading it then fails, and that is reported."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def find_images(root, special=None):
    """All image files under root, recursively, as paths relative to root, sorted so
    runs (and the progress bar) are reproducible. Hidden files/folders are skipped:
    they are usually editor/OS droppings (.DS_Store, ._foo.jpg, .ipynb_checkpoints).
    Entries named like images that are not regular files (is_special_file: a FIFO, socket or
    device) are left out; pass a list as special to have their relative paths appended to it,
    so the caller can say so instead of hanging on them."""
    exts = image_extensions()
    found = []
    seen = set()  # linked folders are followed, as the training loader does; each real folder once
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if os.path.realpath(dirpath) in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(os.path.realpath(dirpath))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # don't descend into hidden
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                continue
            rel = Path(dirpath, name).relative_to(root)
            if not is_special_file(Path(dirpath, name)):
                found.append(rel)
            elif special is not None:
                special.append(rel)
    return sorted(found)


# -----------------------------------------------------------------------------
# converting, resizing and saving one image

# modes that hold a single grey channel; with --mode keep these become "L", all else "RGB"
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# output formats for --format png/jpg: (Pillow format name, file extension)
OUTPUT_FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg")}


def convert_mode(img, mode):
    """Return img in a mode every output format can save and the loader expects.
    mode is "keep", "RGB" or "L". "keep" leaves RGB and L alone and turns the rest
    (palette, RGBA, CMYK, 16-bit, 1-bit, ...) into RGB, or L for grayscale sources."""
    if "A" not in img.getbands() and "transparency" in img.info and img.mode in ("RGB", "L"):
        # an RGB or L image with a transparent colour key: on white, as the loader does (below, for the rest)
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA")).convert(img.mode)
    if mode == "keep":
        if img.mode in ("RGB", "L"):
            return img
        mode = "L" if img.mode in GRAY_MODES else "RGB"
    if img.mode == mode:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grayscale (16-bit PNG/TIFF). Pillow's convert("L") clips every value
        # above 255 to white, so scale the 0..65535 range down to 0..255 ourselves.
        # Float images ("F", rare) have no standard range; we just clip them to 0..255.
        a = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            a = a / 257.0  # 65535 / 257 = 255
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))  # mode "L"
        if mode == "L":
            return img
    if "A" in img.getbands() or "transparency" in img.info:
        # transparent pixels go onto white, as a viewer shows them and as the training loader
        # (utils.fit_image) does; dropping the alpha would keep whatever colour they store,
        # often black. Going through RGBA also handles palette transparency properly.
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert(mode)


def save_atomically(img, dst, pil_format, quality):
    """Write to a hidden temp file, then rename it into place. If the run is killed
    mid-write there is never a half-written dst, which a rerun would otherwise skip
    as 'already exists'. The rename is atomic on the same filesystem."""
    dst.parent.mkdir(parents=True, exist_ok=True)  # exist_ok: workers race on shared folders
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    # quality only means something for lossy formats; PNG etc. reject or ignore it
    kwargs = {"quality": quality} if pil_format in ("JPEG", "WEBP", "AVIF") else {}
    try:
        img.save(tmp, format=pil_format, **kwargs)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():  # only our own partial temp file, never user data
            tmp.unlink()


def process_is_running(pid):
    """Whether a process with this id exists. Signal 0 only asks (POSIX); on Windows os.kill would
    end the process instead, so there a temp file counts as live for its first 10 minutes."""
    if os.name == "nt":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temp_files(dst):
    """Delete the hidden temp files (save_atomically) that a killed run (kill -9, a crash, a power cut)
    left under dst: those whose writer process is gone, or, where that cannot be asked, that are over
    10 minutes old. They hold only partial copies of our own outputs. Returns how many went."""
    removed = 0
    for path in dst.rglob(".*.tmp*") if dst.is_dir() else []:
        pid = path.name.rsplit(".tmp", 1)[1]
        if not path.is_file() or not pid.isdigit():
            continue
        running = process_is_running(int(pid))
        if running is False or (running is None and time.time() - path.stat().st_mtime > 600):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def resize_one(job, size, quality, mode, dry_run):
    """Worker: read, fix orientation and mode, resize + centre-crop, save.
    job = (src path, dst path, Pillow output format). Never raises: a failure is
    returned as data, so one bad file cannot kill the whole pool.
    Returns (status, detail) with status "written" or "failed"; detail is
    True/False for "was upscaled" on success, the error message on failure."""
    src, dst, pil_format = job
    try:
        with Image.open(src) as img:
            img.load()  # decode fully now, so truncated files fail here, inside the try
            # phone photos store rotation as an EXIF tag; apply it so the crop is
            # taken from the image as people see it, not lying on its side
            img = ImageOps.exif_transpose(img)
        upscaled = min(img.size) < size
        # convert before resizing: Lanczos needs 8-bit RGB/L for good results
        img = convert_mode(img, mode)
        # fit = scale so the shorter side is size (Lanczos), then crop the centre
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS)
        if not dry_run:
            save_atomically(img, dst, pil_format, quality)
        return "written", upscaled
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        return "failed", f"{type(e).__name__}: {e}"


# -----------------------------------------------------------------------------
# planning the run


def output_path_and_format(rel, dst_root, fmt):
    """Where the resized version of rel goes, and in which Pillow format."""
    if fmt in OUTPUT_FORMATS:
        pil_format, ext = OUTPUT_FORMATS[fmt]
        return dst_root / rel.with_suffix(ext), pil_format
    # --format keep: same name, same format... unless Pillow can only read that
    # format (e.g. .psd, .xpm), in which case PNG is the lossless fallback
    pil_format = Image.registered_extensions()[rel.suffix.lower()]
    if pil_format not in Image.SAVE:
        return dst_root / rel.with_suffix(".png"), "PNG"
    return dst_root / rel, pil_format


def parse_args():
    p = argparse.ArgumentParser(
        description="Resize every image under SRC_DIR to SIZE x SIZE (shorter side scaled "
        "to SIZE with Lanczos, then centre-cropped) and write it to DST_DIR with the same "
        "folder tree.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src_dir", help="folder of source images (searched recursively)")
    p.add_argument("dst_dir", help="output folder, created if needed; must not be inside src_dir")
    p.add_argument("--size", type=int, default=64, help="output width and height in pixels")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel processes (1 = run in this process, easiest to debug)")
    p.add_argument("--format", choices=["keep", "png", "jpg"], default="keep",
                   help="output file format; keep = same name and format as the source "
                   "(PNG for formats Pillow cannot write)")
    p.add_argument("--quality", type=int, default=None,
                   help="JPEG/WebP quality, 1-100 (95 when not given); lossless --format png takes none")
    p.add_argument("--mode", choices=["keep", "RGB", "L"], default="keep",
                   help="colour mode of the output; keep = RGB and L stay as they are, "
                   "anything else becomes RGB (or L for grayscale sources)")
    p.add_argument("--overwrite", action="store_true", default=False,
                   help="replace output files that already exist (without it they are skipped)")
    p.add_argument("--dry_run", action="store_true", default=False,
                   help="read and process everything but write nothing; report what would happen")
    return p.parse_args()


def check_args(args):
    """Validate the command line. Every problem is a one-line error naming the fix."""
    if args.size < 1:
        sys.exit(f"error: --size must be a positive number of pixels, got {args.size}")
    if args.workers < 1:
        sys.exit(f"error: --workers must be at least 1, got {args.workers}")
    if args.quality is not None and not 1 <= args.quality <= 100:
        sys.exit(f"error: --quality must be between 1 and 100, got {args.quality}")
    if args.quality is not None and args.format == "png":  # PNG is lossless: the flag would do nothing
        sys.exit(f"error: --quality {args.quality} does nothing with --format png (lossless); "
                 "drop --quality, or use --format jpg")
    src = Path(args.src_dir).expanduser().resolve()
    dst = Path(args.dst_dir).expanduser().resolve()
    if not src.exists():
        sys.exit(f"error: source folder {args.src_dir} does not exist; check the path")
    if not src.is_dir():
        sys.exit(f"error: source {args.src_dir} is a file, not a folder; pass the folder that holds the images")
    # writing inside the source would mix outputs into the dataset (and a rerun would
    # resize the resized images); resolve() above makes this catch '..' and symlinks
    if dst == src or src in dst.parents:
        sys.exit(f"error: output folder {args.dst_dir} is inside source folder {args.src_dir}; "
                 f"pick a folder outside it, e.g. {src.parent / (src.name + f'_{args.size}')}")
    if dst in src.parents:  # the output tree would cover the source (src/<name>/... lands on src itself)
        sys.exit(f"error: output folder {args.dst_dir} contains source folder {args.src_dir}; "
                 f"pick a folder outside it, e.g. {src.parent / (src.name + f'_{args.size}')}")
    if dst.exists() and not dst.is_dir():
        sys.exit(f"error: output {args.dst_dir} exists and is a file; pass a folder path")
    return src, dst


def make_output_folder(dst, dst_arg, dry_run):
    """Create dst and write a probe file in it, so that an output folder that cannot be made or
    written (a read-only disk, a path under a file, /proc/...) is one line at the start, not one
    failure per image. A dry run creates nothing: it asks whether the nearest existing folder
    on the path is writable."""
    if dry_run:
        existing = next(p for p in (dst, *dst.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            sys.exit(f"error: cannot create or write output folder {dst_arg} ({existing} is not a writable "
                     "folder); pick a folder you can write to")
        return
    probe = dst / f".write_test{os.getpid()}"
    try:
        dst.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        sys.exit(f"error: cannot create or write output folder {dst_arg} ({e.strerror or e}); "
                 "pick a folder you can write to")


def earlier_format_copy(dst, claimed):
    """(an existing output, the planned output it clashes with), or None. An earlier run with another
    --format left cmyk.jpg where this one would write cmyk.png: the folder would then hold two copies
    of one image (and the loader would train on both), and --overwrite would not help, since it
    replaces only files of the same name."""
    if not dst.is_dir():
        return None
    existing_by_stem = {}  # "cls/cmyk" -> the output files with that name less extension
    for rel in find_images(dst):
        existing_by_stem.setdefault(rel.with_suffix(""), []).append(rel)
    for out in claimed:
        planned = out.relative_to(dst)
        others = [rel for rel in existing_by_stem.get(planned.with_suffix(""), []) if dst / rel not in claimed]
        if others:
            return others[0], planned
    return None


def list_some(items, limit=10):
    """Print the first few (name, reason) pairs, then how many were left out."""
    for name, reason in items[:limit]:
        print(f"    {name}: {reason}")
    if len(items) > limit:
        print(f"    ... and {len(items) - limit} more")


def main():
    args = parse_args()
    src, dst = check_args(args)

    if not args.dry_run and (removed := remove_stale_temp_files(dst)):
        print(f"removed {removed} partial temp files that a killed run left in {dst}")
    special = []  # named pipes and devices named like images: opening one would never return
    rels = find_images(src, special)
    if not rels:
        sys.exit(f"error: no images found in {args.src_dir} (searched recursively for files "
                 f"Pillow can open, e.g. .jpg .png); check the path")

    # plan every output before doing any work, so name clashes are found up front
    jobs, skipped, claimed, formats = [], [], {}, set()
    for rel in rels:
        out, pil_format = output_path_and_format(rel, dst, args.format)
        if out in claimed:
            # e.g. a.jpg and a.png both becoming a.png with --format png
            sys.exit(f"error: {claimed[out]} and {rel} would both be written to "
                     f"{out.relative_to(dst)}; rename one, or use --format keep")
        claimed[out] = rel
        formats.add(pil_format)
        if out.exists() and not args.overwrite:
            skipped.append(rel)
        else:
            jobs.append((src / rel, out, pil_format))

    if clash := earlier_format_copy(dst, claimed):
        sys.exit(f"error: {args.dst_dir} already holds {clash[0]} from an earlier run with another --format; "
                 f"--format {args.format} would write {clash[1]} beside it (two copies of one image): "
                 "pick a new folder, or use that run's --format")

    if skipped and not args.dry_run:  # skipped outputs of another --size would mix two sizes in one folder
        try:
            with Image.open(output_path_and_format(skipped[0], dst, args.format)[0]) as earlier:
                earlier_size = earlier.size
        except OSError:  # not an image: nothing to compare
            earlier_size = (args.size, args.size)
        if earlier_size != (args.size, args.size):
            sys.exit(f"error: {args.dst_dir} already holds {earlier_size[0]}x{earlier_size[1]} images from an "
                     f"earlier run (e.g. {skipped[0]}); with --size {args.size} they would be skipped and left "
                     "as they are: pick a new folder, or add --overwrite")
    make_output_folder(dst, args.dst_dir, args.dry_run)  # the last check: an error above leaves no folder behind

    # do the work: in-process for 1 worker (simple, debuggable), else a process pool,
    # since decoding and Lanczos resizing are CPU-bound and the GIL would serialise threads
    quality = 95 if args.quality is None else args.quality
    if args.quality is not None and not formats & {"JPEG", "WEBP", "AVIF"}:
        print(f"note: --quality {args.quality} changes nothing: no output here is JPEG or WebP")
    work = partial(resize_one, size=args.size, quality=quality, mode=args.mode, dry_run=args.dry_run)
    workers = max(1, min(args.workers, len(jobs)))
    bar = dict(total=len(jobs), desc="dry run" if args.dry_run else "resizing", unit="img")
    if workers == 1:
        results = [work(job) for job in tqdm(jobs, **bar)]
    else:
        # chunks amortise inter-process overhead over many small images, while staying
        # small enough that the progress bar still moves and the load balances
        chunksize = max(1, min(64, len(jobs) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(work, jobs, chunksize=chunksize), **bar))

    written = sum(status == "written" for status, _ in results)
    upscaled = sum(status == "written" and detail for status, detail in results)
    failed = [(job[0].relative_to(src).as_posix(), detail)
              for job, (status, detail) in zip(jobs, results) if status == "failed"]

    # summary; a dry run went through the same decode/resize steps, so its numbers are real
    if args.dry_run:
        print(f"dry run: nothing was written. {len(rels)} images found in {src}")
    else:
        print(f"{len(rels)} images found in {src}")
    print(f"  {'would write' if args.dry_run else 'written'}:  {written} at {args.size}x{args.size}")
    if upscaled:
        print(f"    ({upscaled} of them upscaled: shorter side < {args.size}; "
              f"tools/clean_dataset.py --min_size {args.size} finds such images)")
    print(f"  skipped:  {len(skipped)} (output already exists"
          f"{'; pass --overwrite to replace' if skipped else ''})")
    print(f"  failed:   {len(failed)} (could not be read or written; nothing written for them)")
    list_some(failed)
    if special:
        print(f"  not read: {len(special)} (named like an image but a named pipe, socket or device, which "
              "the training loader would wait on forever; move it out of the dataset)")
        list_some([(rel.as_posix(), "not a regular file") for rel in sorted(special)])
    print(f"  output folder: {dst}")


if __name__ == "__main__":  # guard needed: worker processes may re-import this file
    main()
