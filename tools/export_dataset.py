"""
Export a dataset to a folder of PNGs with one subfolder per class, the format train.py reads from
--dataset_path: an MNIST-style .npz file (arrays x_train [N x H x W] or [N x H x W x C] uint8,
y_train [N]), or one of train.py's built-in datasets.

    python tools/export_dataset.py ../shared/data/mnist.npz data/mnist          # data/mnist/0/00001.png ...
    python tools/export_dataset.py fashion_mnist.npz data/fashion --split test  # x_test / y_test
    python tools/export_dataset.py shapes data/shapes --image_size 32           # the offline built-in

.npz images keep their size; built-ins are made at --image_size. train.py also reads an .npz file
directly (python train.py --dataset_path mnist.npz); a folder is what the other tools (classifier.py,
sampler_sweep.py, clean_dataset.py) and your image viewer read.

The images are written into <out_dir>.partial beside out_dir, which is renamed to out_dir only when
every image is there: an out_dir that exists is a finished export. An export that was stopped
(Ctrl-C, kill) leaves at most that .partial folder, which the next run removes and starts again.
"""
import argparse
import os
import shutil
import sys

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UsageError, check_output_folder, load_builtin_dataset, read_npz_arrays  # noqa: E402

BUILTIN = ("shapes", "mnist", "fashion_mnist", "cifar10")
DEFAULT_IMAGE_SIZE = 32
# a file inside the .partial folder while it is being written: it marks the folder as ours, so a
# rerun may remove it (and never removes a folder of that name that someone else made)
PARTIAL_MARKER = ".export_dataset_partial"


def read_npz(path, split):
    """(uint8 images [N x H x W (x C)], folder name of each image's class)."""
    images, labels = read_npz_arrays(path, split)
    return images, [str(label) for label in labels.tolist()]


def read_builtin(name, image_size):
    dataset = load_builtin_dataset(name, image_size)
    images = dataset.images.permute(0, 2, 3, 1).numpy()  # [N x S x S x C], as PIL wants
    return images, [dataset.class_names[int(label)] for label in dataset.labels]


def check_class_names(classes, source):
    """Each class name becomes one folder under out_dir, so it must be one plain folder name: a label
    '../x' would write outside out_dir, 'a/b' a nested folder (a class 'a' holding 'b'), '' or '.' into
    out_dir itself, and '.x' a hidden folder that the training loader skips."""
    separators = [s for s in (os.sep, os.altsep, "/", "\0") if s]
    for index, name in enumerate(classes):
        if name in ("", ".", "..") or name.startswith(".") or any(s in name for s in separators):
            raise UsageError(f"{source}: label {name!r} (image {index}) cannot be a class folder name (it is empty, "
                             "starts with '.' or holds a path separator); relabel it in the .npz file")


def remove_partial_export(partial):
    """Remove the .partial folder an interrupted export left, if it is one (it holds PARTIAL_MARKER);
    refuse anything else of that name. It holds only PNGs that a rerun writes again."""
    if not os.path.lexists(partial):
        return
    ours = os.path.isdir(partial) and not os.path.islink(partial) and os.path.isfile(os.path.join(partial, PARTIAL_MARKER))
    if not ours:
        raise UsageError(f"{partial} is in the way (the export writes there first) and was not left by this tool; "
                         "move it away, or pick another out_dir")
    shutil.rmtree(partial)
    print(f"removed {partial}, the unfinished export of an earlier run that was stopped")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help=f"an .npz file, or a built-in dataset: {', '.join(BUILTIN)}")
    p.add_argument("out_dir", help="folder to create; one subfolder per class")
    p.add_argument("--split", default="train", help=".npz: which arrays, x_<split> and y_<split>")
    p.add_argument("--image_size", type=int, default=None,
                   help=f"built-in datasets: the size to make them at ({DEFAULT_IMAGE_SIZE} when not given); "
                   ".npz images keep their own")
    p.add_argument("--limit", type=int, default=0, help="export only the first N images (0 = all)")
    p.add_argument("--dry_run", action="store_true", help="print what would be written, write nothing")
    args = p.parse_args(argv)
    # every flag is checked before any download or image is written
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: pass a number of images, or 0 for all of them")
    if args.image_size is not None and args.source not in BUILTIN:
        raise UsageError(f"--image_size applies to the built-in datasets ({', '.join(BUILTIN)}); "
                         f"{args.source}'s images keep their size: drop --image_size")
    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image_size {args.image_size}: pass a positive number of pixels, e.g. {DEFAULT_IMAGE_SIZE}")
    if args.source in BUILTIN and args.split != "train":
        raise UsageError(f"--split {args.split}: the built-in datasets export their training images only; "
                         "drop --split")
    out_dir = os.path.normpath(args.out_dir)  # "data/mnist/" -> "data/mnist", so its .partial is a sibling
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UsageError(f"{args.out_dir} exists and is not an empty folder; if an earlier export wrote it, use it as "
                         "it is, else pick a new folder")  # only a finished export is ever renamed to out_dir
    partial = out_dir + ".partial"
    if not args.dry_run:
        remove_partial_export(partial)
        check_output_folder(os.path.dirname(os.path.abspath(out_dir)), f"out_dir {args.out_dir}: the folder")

    if args.source in BUILTIN:
        images, classes = read_builtin(args.source, args.image_size or DEFAULT_IMAGE_SIZE)
    else:
        images, classes = read_npz(args.source, args.split)
    if args.limit > 0:
        images, classes = images[:args.limit], classes[:args.limit]
    check_class_names(classes, args.source)

    print(f"{len(images)} images {images.shape[1:]} in {len(set(classes))} classes -> {args.out_dir}/<class>/")
    if args.dry_run:
        print("dry run: nothing written")
        return
    os.makedirs(partial)
    open(os.path.join(partial, PARTIAL_MARKER), "w").close()
    try:
        width = len(str(len(images)))
        for index, (image, name) in enumerate(tqdm(zip(images, classes), total=len(images), desc="exporting")):
            folder = os.path.join(partial, name)
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image.squeeze()).save(os.path.join(folder, f"{index:0{width}d}.png"))
        os.remove(os.path.join(partial, PARTIAL_MARKER))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # the empty folder allowed above; rmdir never removes a file
        os.rename(partial, out_dir)
    except BaseException:  # an error or Ctrl-C: no half export is left to be taken for a whole one
        shutil.rmtree(partial, ignore_errors=True)
        raise
    print(f"wrote {len(images)} PNGs to {args.out_dir}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # Ctrl-C: main() has removed the unfinished folder; say so, not a traceback
        print("interrupted: the export did not finish and left nothing behind; run it again", file=sys.stderr)
        sys.exit(130)
