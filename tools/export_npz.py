"""
Export an MNIST-style .npz (arrays x_train [N x H x W] or [N x H x W x C] uint8, y_train [N]) to a
folder of PNGs with one subfolder per label, the format train.py reads:

    python tools/export_npz.py ../shared/data/mnist.npz data/mnist            # data/mnist/0/00001.png ...
    python tools/export_npz.py fashion_mnist.npz data/fashion --split test     # x_test / y_test

Then: python train.py --dataset_path data/mnist --channels 1 --hflip off
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("npz", help="the .npz file")
    p.add_argument("out_dir", help="folder to create; one subfolder per label")
    p.add_argument("--split", default="train", help="which arrays: x_<split> and y_<split>")
    p.add_argument("--dry_run", action="store_true", help="print what would be written, write nothing")
    args = p.parse_args()

    if not os.path.isfile(args.npz):
        sys.exit(f"error: {args.npz}: no such file; pass an .npz with x_{args.split} and y_{args.split}")
    try:
        data = np.load(args.npz)
        images, labels = data[f"x_{args.split}"], data[f"y_{args.split}"]
    except (KeyError, ValueError, OSError) as error:
        sys.exit(f"error: {args.npz}: cannot read arrays x_{args.split} and y_{args.split} ({error})")
    if images.dtype != np.uint8 or len(images) != len(labels) or images.ndim not in (3, 4):
        sys.exit(f"error: {args.npz}: expected uint8 x_{args.split} [N x H x W (x C)] and N labels, "
                 f"got {images.dtype} {images.shape} and {labels.shape}")
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        sys.exit(f"error: {args.out_dir} exists and is not empty; pick a new folder")

    print(f"{len(images)} images {images.shape[1:]} in {len(np.unique(labels))} classes -> {args.out_dir}/<label>/")
    if args.dry_run:
        print("dry run: nothing written")
        return
    width = len(str(len(images)))
    for index, (image, label) in enumerate(tqdm(zip(images, labels), total=len(images), desc="exporting")):
        folder = os.path.join(args.out_dir, str(label))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image.squeeze()).save(os.path.join(folder, f"{index:0{width}d}.png"))
    print(f"wrote {len(images)} PNGs to {args.out_dir}")


if __name__ == "__main__":
    main()
