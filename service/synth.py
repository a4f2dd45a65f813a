"""`python -m service.synth out=<dir> classes=N images_per_class=M ...`: a synthetic ImageNet.

Writes a learnable synthetic dataset in one of the raw ImageNet layouts
(see `service/data/synthetic.py`). Keys are Hydra overrides on
`conf/synth.yaml` (schema `SynthConfig`); `--help` lists them.
"""

from __future__ import annotations

import sys
import time

from service import hydra_app
from service.data.synthetic import SynthConfig, generate


def main(cfg: SynthConfig) -> int:
    """Generate the dataset; 1 with a one-line message when `out` cannot be written."""
    start = time.time()
    try:
        manifest = generate(cfg)
    except OSError as err:
        print(f"service.synth: cannot write out={cfg.out}: {err}", file=sys.stderr)
        return 1
    print(f"synth: wrote {manifest['num_inputs']} inputs ({len(manifest['wnids'])} classes, layout {cfg.layout}) "
          f"to {cfg.out} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    hydra_app.run("synth", SynthConfig, SynthConfig.validate, main)
