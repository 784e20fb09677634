"""
Find the images in a dataset folder that would hurt or crash training, and report them.

A single unreadable file can kill a training run hours in (the DataLoader raises when it
reaches it), and tiny or duplicated images quietly skew what the model learns. This
script opens every image once and sorts the problems into categories:

    corrupted  Pillow cannot open the file, or img.verify() fails (bad header/checksums), or
               it is not a regular file (a named pipe, socket or device named like an image,
               which the training loader would wait on forever)
    truncated  it opens, but a full decode (img.load()) fails, e.g. a half-downloaded JPEG
    too_small  min(width, height) < --min_size: it would have to be upscaled a lot
    duplicate  byte-identical to another file (same sha256); the first in sorted path
               order is kept, the later copies are duplicates. A real file is kept before
               a symbolic link to the same bytes, so --move takes the links, never the file
               a kept link points to
    odd_mode   mode is not RGB or L (CMYK, P, RGBA, I;16, 1, LA, ...). Only a warning: the
               training loader converts these, so they are moved only with --move_odd_mode

Each file is reported once, under the first category above that applies (odd_mode last,
so a duplicated CMYK image is reported as a duplicate and can be moved).

By default this only reports; nothing on disk changes. With --move, the rejected files are
moved (never deleted) to a folder beside the dataset, keeping the class tree:
    <DATA_DIR>_rejected/<category>/<relative path>
so you can inspect them, and move them back by hand if a rejection was wrong.

Usage examples:

    # report only
    python tools/clean_dataset.py data/flowers

    # also write a CSV (path,category,detail) with every problem file
    python tools/clean_dataset.py data/flowers --min_size 64 --report flowers_problems.csv

    # see what --move would do, then do it
    python tools/clean_dataset.py data/flowers --move --dry_run
    python tools/clean_dataset.py data/flowers --move

    # move odd-mode images too, to a folder of your choice
    python tools/clean_dataset.py data/flowers --move --move_odd_mode --rejected_dir /tmp/flowers_rej

An "image" is any file whose extension Pillow can open (searched recursively); hidden files
and folders (names starting with '.') are skipped. The exit code is 0 whether or not problems
were found (this is a report); it is non-zero only for bad input, or when --move could not move
a file (it is then listed, and still where it was).

This script needs only the standard library, pillow, tqdm and its sibling tools/resize_dataset.py
(which finds the images for both), so it works before the rest of the repository is set up.
"""

import argparse
import csv
import hashlib
import io
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import resize_dataset  # its sibling in tools/, on sys.path as the running script's folder

# Note: we deliberately do NOT set ImageFile.LOAD_TRUNCATED_IMAGES = True. It makes Pillow
# fill the missing part of a truncated file with grey instead of raising, which is exactly
# the problem we want to find.

# categories in the order they are checked and reported
CATEGORIES = ["corrupted", "truncated", "too_small", "duplicate", "odd_mode"]
GOOD_MODES = {"RGB", "L"}
REPORT_HEADER = ["path", "category", "detail"]  # the --report CSV's first row

# -----------------------------------------------------------------------------
# finding images: the same files as tools/resize_dataset.py finds (its find_images; both tools need only
# Pillow, NumPy and tqdm, not the rest of the repository)


def find_images(root):
    """All image files under root, as paths relative to root, in sorted order (which also decides which
    copy of a duplicate is 'first' and kept): resize_dataset.find_images, hidden files and folders
    skipped, linked folders followed as the training loader does. Named pipes, sockets and devices
    named like images are included: the training loader would list them too, so they are reported
    (check_image never opens them)."""
    special = []
    found = resize_dataset.find_images(root, special)
    return sorted(found + special, key=lambda p: p.as_posix())


# -----------------------------------------------------------------------------
# checking one image


def check_image(path, min_size):
    """Open one file and run the checks that depend only on the file itself.
    Returns (category or None, detail, sha256 hex digest, mode or None).
    Duplicates and odd modes are decided by the caller, which sees all files."""
    if resize_dataset.is_special_file(path):  # reading a named pipe would wait for a writer forever
        detail = "not a regular file (a named pipe, socket or device); reading it would never end"
        return "corrupted", detail, None, None
    try:
        data = path.read_bytes()  # read once: the hash and both opens below use these bytes
    except OSError as e:
        return "corrupted", f"cannot read file: {e}", None, None
    digest = hashlib.sha256(data).hexdigest()

    # Pillow raises many exception types on bad input (OSError, SyntaxError, ValueError,
    # struct.error, ...), so each step catches Exception and reports the message
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # Pillow names the in-memory copy (<_io.BytesIO object at ...>): the report names the file
        return "corrupted", "cannot open: " + re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)), digest, None
    try:
        # verify() checks structure/checksums without decoding (it catches, e.g., a PNG
        # with bad CRCs). It leaves the image unusable, hence the second open below.
        img.verify()
    except Exception as e:
        return "corrupted", f"verify failed: {e}", digest, None
    try:
        # a full decode: the only way to notice a JPEG whose second half is missing,
        # because verify() does not check JPEG data at all
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        return "truncated", f"full decode failed: {e}", digest, None

    w, h = img.size
    if min(w, h) < min_size:
        return "too_small", f"{w}x{h}, shorter side < --min_size {min_size}", digest, img.mode
    return None, "", digest, img.mode


def scan(root, rels, min_size):
    """Check every image; returns a list of (rel, category, detail) for problem files
    and the number of images with no problem."""
    checked = [(rel, *check_image(root / rel, min_size)) for rel in tqdm(rels, desc="checking", unit="img")]

    # The copy of each content that stays: the first real file in sorted order, else the first link.
    # A symbolic link has the bytes of the file it points to, so "the first copy" could be a link
    # (a.png -> z.png) and its target the "duplicate"; moving z.png would leave a.png pointing at
    # nothing. Keeping the real file means --move only ever takes links (moving a link moves just
    # the link) or real files that no kept entry points to.
    kept = {}  # sha256 -> the rel that stays
    for rel, category, _, digest, _ in checked:
        # byte-identical files get identical results from the checks, so only clean files compete
        if category is None and (digest not in kept or ((root / kept[digest]).is_symlink()
                                                        and not (root / rel).is_symlink())):
            kept[digest] = rel

    problems, n_ok = [], 0
    for rel, category, detail, digest, mode in checked:
        if category is None and kept[digest] != rel:
            keeper = kept[digest].as_posix()
            same_file = os.path.realpath(root / rel) == os.path.realpath(root / kept[digest])
            category, detail = "duplicate", (f"a link to {keeper}, which stays" if same_file
                                             else f"same bytes as {keeper}")
        elif category is None and mode not in GOOD_MODES:
            category, detail = "odd_mode", f"mode {mode}; the training loader converts it"
        if category is None:
            n_ok += 1
        else:
            problems.append((rel, category, detail))
    return problems, n_ok


# -----------------------------------------------------------------------------
# moving rejected files


def free_path(path):
    """path, or path with _1, _2, ... before the extension if it already exists.
    shutil.move onto an existing file silently replaces it on Linux, which would
    destroy a file rejected by an earlier run: nothing may ever be deleted. lexists, not
    exists: a moved symbolic link may point nowhere from its new place, and is still there."""
    candidate, i = path, 1
    while os.path.lexists(candidate):
        candidate = path.with_name(f"{path.stem}_{i}{path.suffix}")
        i += 1
    return candidate


def move_rejected(root, to_move, rejected_dir, dry_run):
    """Move each (rel, category) file to rejected_dir/category/rel, keeping the folder
    tree so class labels are still visible and same-named files in different classes
    cannot collide. With dry_run, only print what would be moved. Returns the (rel, reason)
    of files that could not be moved (they stay where they were: shutil.move removes the
    source only after a complete copy)."""
    failed = []
    for rel, category in to_move:
        dst = free_path(rejected_dir / category / rel)
        if dry_run:
            print(f"  would move {rel.as_posix()} -> {dst}")
            continue
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(root / rel), str(dst))  # move, never delete; a link moves as a link
        except OSError as e:  # e.g. a named pipe cannot be copied to another disk
            failed.append((rel, f"{type(e).__name__}: {e}"))
    return failed


# -----------------------------------------------------------------------------


def write_report(path, problems):
    """The CSV rows path,category,detail, written to a temp file beside path and renamed into place,
    so an interrupted run never leaves half a report (nor half of the one it replaces)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(REPORT_HEADER)
            for rel, category, detail in problems:
                writer.writerow([rel.as_posix(), category, detail])
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only our own partial temp file
            tmp.unlink()


def check_report_path(report, root):
    """Refuse a --report that would overwrite something it should not: a file inside the dataset (an
    image turned into CSV text), a name that is not .csv, or an existing file this tool did not
    write. Returns the resolved path."""
    path = Path(report).expanduser()
    resolved = path.resolve()  # catches '..' and links into the dataset
    if root in resolved.parents:
        sys.exit(f"error: --report {report} is inside data folder {root}; write it outside, e.g. "
                 f"{root.parent / (root.name + '_problems.csv')}")
    if path.is_dir():
        sys.exit(f"error: --report {report} is a folder; pass a file path such as {path / 'report.csv'}")
    if path.suffix.lower() != ".csv":
        sys.exit(f"error: --report {report}: name a .csv file, e.g. {path.with_suffix('.csv')}")
    if not resolved.parent.is_dir():
        sys.exit(f"error: the folder for --report {report} does not exist; create it or pick another path")
    if resolved.exists():
        try:
            with open(resolved, newline="") as f:
                first = f.readline()
        except (OSError, UnicodeDecodeError):
            first = None
        if first is None or (first and next(csv.reader([first]), None) != REPORT_HEADER):
            sys.exit(f"error: --report {report} exists and is not a report this tool wrote (its first line is "
                     f"not {','.join(REPORT_HEADER)}); pick a new file name")
    if not os.access(resolved.parent, os.W_OK | os.X_OK):
        sys.exit(f"error: cannot write --report {report} ({resolved.parent} is not writable); pick another path")
    return resolved


def parse_args():
    p = argparse.ArgumentParser(
        description="Report corrupted, truncated, too small, duplicate and odd-mode images "
        "in DATA_DIR; with --move, move the bad ones to a folder beside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data_dir", help="dataset folder (searched recursively)")
    p.add_argument("--min_size", type=int, default=32,
                   help="images whose shorter side is below this many pixels are 'too_small' "
                   "(0 disables the check)")
    p.add_argument("--move", action="store_true", default=False,
                   help="move rejected files out of data_dir (default: report only)")
    p.add_argument("--move_odd_mode", action="store_true", default=False,
                   help="with --move, also move odd_mode images (CMYK, P, RGBA, 16-bit, ...)")
    p.add_argument("--rejected_dir", default=None,
                   help="where --move puts files, as <rejected_dir>/<category>/<relative path>; "
                   "must be outside data_dir (default: <data_dir>_rejected beside data_dir)")
    p.add_argument("--report", default=None, metavar="FILE.csv",
                   help="also write every problem file as CSV rows path,category,detail")
    p.add_argument("--max_list", type=int, default=20,
                   help="list at most this many files per category on screen (0 = all); "
                   "the --report CSV always has all of them")
    p.add_argument("--dry_run", action="store_true", default=False,
                   help="change nothing on disk; with --move, print what would be moved "
                   "(the --report CSV is still written)")
    return p.parse_args()


def check_args(args):
    """Validate the command line before the (possibly long) scan. Every problem is a
    one-line error naming the fix. Returns (data folder, rejected folder, report file or None)."""
    if args.min_size < 0:
        sys.exit(f"error: --min_size must be 0 or more pixels, got {args.min_size}")
    if args.max_list < 0:
        sys.exit(f"error: --max_list must be 0 (all) or more, got {args.max_list}")
    root = Path(args.data_dir).expanduser().resolve()
    if not root.exists():
        sys.exit(f"error: data folder {args.data_dir} does not exist; check the path")
    if not root.is_dir():
        sys.exit(f"error: {args.data_dir} is a file, not a folder; pass the folder that holds the images")
    if args.rejected_dir is not None:
        rejected = Path(args.rejected_dir).expanduser().resolve()
    elif root.parent == root:
        sys.exit("error: cannot put the rejected folder beside the filesystem root; pass --rejected_dir")
    else:
        rejected = root.parent / f"{root.name}_rejected"
    # inside the dataset, rejected files would still be found by the training loader
    # (and by the next scan); resolve() above makes this catch '..' and symlinks
    if rejected == root or root in rejected.parents:
        sys.exit(f"error: --rejected_dir {args.rejected_dir} is inside data folder {args.data_dir}; "
                 f"pick a folder outside it, e.g. {root.parent / (root.name + '_rejected')}")
    if rejected.exists() and not rejected.is_dir():
        sys.exit(f"error: rejected folder {rejected} exists and is a file; pass another --rejected_dir")
    report = None if args.report is None else check_report_path(args.report, root)
    if args.move and not args.dry_run:
        # moving starts only after the scan: find out now, not after some files have moved, if it cannot
        existing = next(p for p in (rejected, *rejected.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            sys.exit(f"error: cannot create or write the rejected folder {rejected} ({existing} is not writable); "
                     "pass a --rejected_dir you can write to")
    return root, rejected, report


def main():
    args = parse_args()
    root, rejected, report = check_args(args)

    rels = find_images(root)
    if not rels:
        sys.exit(f"error: no images found in {args.data_dir} (searched recursively for files "
                 f"Pillow can open, e.g. .jpg .png); check the path")

    problems, n_ok = scan(root, rels, args.min_size)
    by_category = {c: [(rel, detail) for rel, cat, detail in problems if cat == c] for c in CATEGORIES}

    if report is not None:
        write_report(report, problems)

    # which files --move takes out: everything except odd_mode, unless asked
    moved_categories = [c for c in CATEGORIES if c != "odd_mode" or args.move_odd_mode]
    to_move = [(rel, cat) for rel, cat, _ in problems if cat in moved_categories]

    # per-category counts, then the files themselves
    print(f"{len(rels)} images checked in {root}")
    print(f"  {'ok':<10} {n_ok}")
    for c in CATEGORIES:
        warn = c == "odd_mode" and by_category[c] and not args.move_odd_mode
        note = " (warning only: moved with --move --move_odd_mode)" if warn else ""
        print(f"  {c:<10} {len(by_category[c])}{note}")
    for c in CATEGORIES:
        items = by_category[c]
        if not items:
            continue
        print(f"{c}:")
        shown = items if args.max_list == 0 else items[: args.max_list]
        for rel, detail in shown:
            print(f"  {rel.as_posix()}  ({detail})")
        if len(shown) < len(items):
            print(f"  ... and {len(items) - len(shown)} more (see --report FILE.csv for all)")
    if report is not None:
        print(f"report written to {args.report} ({len(problems)} rows)")

    # act (or say how to)
    if not problems:
        print("no problems found; nothing to do")
    elif not to_move:
        print("nothing to move (odd_mode images are moved only with --move --move_odd_mode)")
    elif not args.move:
        # rebuild the user's own command line with --move added, so it can be pasted
        # (--dry_run dropped: with it, --move would still change nothing)
        cmd = shlex.join(["python", sys.argv[0], *[a for a in sys.argv[1:] if a != "--dry_run"], "--move"])
        print(f"report only: no image was moved or changed. To move the {len(to_move)} rejected "
              f"files to {rejected}/<category>/, run:\n  {cmd}")
    elif args.dry_run:
        move_rejected(root, to_move, rejected, dry_run=True)
        print(f"dry run: would move {len(to_move)} files to {rejected}; nothing was moved")
    else:
        failed = move_rejected(root, to_move, rejected, dry_run=False)
        print(f"moved {len(to_move) - len(failed)} files to {rejected}/<category>/ (nothing was deleted)")
        if failed:
            print(f"could not move {len(failed)} files (they are still in {root}):")
            for rel, reason in failed:
                print(f"  {rel.as_posix()}  ({reason})")
            sys.exit(1)


if __name__ == "__main__":
    main()
