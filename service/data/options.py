"""The data options every layer agrees on, defined once.

Config validation (`service.config`), the pipeline, ingest and the CLIs
import these; nothing else spells them out.
"""

# Training augmentation: the paper's (random 224 crop of 256 + flip + PCA
# lighting) or RandomResizedCrop + flip.
AUGMENTATIONS = ("paper", "rrc")
# Evaluation crops: the centre crop, or the paper's 10 (4 corners + centre, and mirrored).
EVAL_CROPS = (1, 10)
# Raw ImageNet layouts `service.ingest` reads and `service.synth` writes.
LAYOUTS = ("imagefolder", "ilsvrc-tars", "kaggle")
