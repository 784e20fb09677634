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
"""
import argparse
import os
import sys

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import UsageError, load_builtin_dataset, read_npz_arrays  # noqa: E402

BUILTIN = ("shapes", "mnist", "fashion_mnist", "cifar10")


def read_npz(path, split):
    """(uint8 images [N x H x W (x C)], folder name of each image's class)."""
    images, labels = read_npz_arrays(path, split)
    return images, [str(label) for label in labels.tolist()]


def read_builtin(name, image_size):
    dataset = load_builtin_dataset(name, image_size)
    images = dataset.images.permute(0, 2, 3, 1).numpy()  # [N x S x S x C], as PIL wants
    return images, [dataset.class_names[int(label)] for label in dataset.labels]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help=f"an .npz file, or a built-in dataset: {', '.join(BUILTIN)}")
    p.add_argument("out_dir", help="folder to create; one subfolder per class")
    p.add_argument("--split", default="train", help=".npz: which arrays, x_<split> and y_<split>")
    p.add_argument("--image_size", type=int, default=32, help="built-in datasets: the size to make them at")
    p.add_argument("--limit", type=int, default=0, help="export only the first N images (0 = all)")
    p.add_argument("--dry_run", action="store_true", help="print what would be written, write nothing")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir) and (not os.path.isdir(args.out_dir) or os.listdir(args.out_dir)):
        raise UsageError(f"{args.out_dir} exists and is not an empty folder; if an earlier export wrote it, use it as "
                         "it is, else pick a new folder")  # before any download

    if args.source in BUILTIN:
        images, classes = read_builtin(args.source, args.image_size)
    else:
        images, classes = read_npz(args.source, args.split)
    if args.limit > 0:
        images, classes = images[:args.limit], classes[:args.limit]

    print(f"{len(images)} images {images.shape[1:]} in {len(set(classes))} classes -> {args.out_dir}/<class>/")
    if args.dry_run:
        print("dry run: nothing written")
        return
    width = len(str(len(images)))
    for index, (image, name) in enumerate(tqdm(zip(images, classes), total=len(images), desc="exporting")):
        folder = os.path.join(args.out_dir, name)
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image.squeeze()).save(os.path.join(folder, f"{index:0{width}d}.png"))
    print(f"wrote {len(images)} PNGs to {args.out_dir}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
