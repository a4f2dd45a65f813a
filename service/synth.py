"""`python -m service.synth out=<dir> classes=N images_per_class=M ...`: a synthetic ImageNet.

Writes a learnable synthetic dataset in one of the raw ImageNet layouts
(see `service/data/synthetic.py`). Arguments are `key=value` like Hydra
overrides; `help` lists them.
"""

from __future__ import annotations

import sys
import time

from service.data.cli_args import Arg, parse_args, parse_bool
from service.data.synthetic import LAYOUTS, SynthConfig, generate

SPEC = {
    "out": Arg(str, None, "output folder", required=True),
    "classes": Arg(int, 10, "number of classes (2-99, real ImageNet wnids)"),
    "images_per_class": Arg(int, 50, "training images per class"),
    "val_per_class": Arg(int, 10, "validation images per class"),
    "layout": Arg(str, "imagefolder", "raw layout to write", choices=LAYOUTS),
    "seed": Arg(int, 0, "random seed; output is identical for a seed"),
    "size_scale": Arg(float, 1.0, "image size factor (1.0 = ImageNet-like ~500x375)"),
    "bad_inputs": Arg(parse_bool, False, "add CMYK/PNG/grayscale/EXIF/truncated/empty/non-image/unknown-wnid inputs"),
    "workers": Arg(int, 1, "rendering processes (output identical for any count)"),
    "devkit_meta": Arg(str, "mat", "ilsvrc-tars synsets file: meta.mat or synsets.txt", choices=("mat", "txt")),
}


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv, SPEC, "service.synth")
        cfg = SynthConfig(**args)
        start = time.time()
        manifest = generate(cfg)
    except ValueError as err:
        print(f"service.synth: {err}", file=sys.stderr)
        return 2
    print(f"synth: wrote {manifest['num_inputs']} inputs ({len(manifest['wnids'])} classes, layout {cfg.layout}) "
          f"to {cfg.out} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
