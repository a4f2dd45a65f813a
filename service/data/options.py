"""The data options every layer agrees on, defined once.

Config validation (`service.config`), the pipeline, ingest and the CLIs
import these; nothing else spells them out.
"""

from dataclasses import dataclass

# Training augmentation: the paper's (random 224 crop of 256 + flip + PCA
# lighting) or RandomResizedCrop + flip.
AUGMENTATIONS = ("paper", "rrc")
# Evaluation crops: the centre crop, or the paper's 10 (4 corners + centre, and mirrored).
EVAL_CROPS = (1, 10)
# Where training images are decoded: "cpu" in Ray Data tasks, "device" on each
# tower's own device (GPU: nvImageCodec's hardware/CUDA decoders; CPU: its
# CPU backend), "auto" = device when training on GPUs, else cpu.
DECODE_MODES = ("auto", "cpu", "device")
RESOLVED_DECODE_MODES = ("cpu", "device")
# Raw ImageNet layouts `service.ingest` reads and `service.synth` writes.
LAYOUTS = ("imagefolder", "ilsvrc-tars", "kaggle")


@dataclass
class S3Keys:
    """The S3 keys of a config (the ingest CLI's; suitable as a base of
    `DataConfig` too), read by `storage.S3Settings.from_fields`."""

    # -- S3 endpoint override, e.g. http://127.0.0.1:9000 (MinIO, a local
    #    server); empty = AWS, or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    # -- Explicit keys; empty = AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #    Secrets: redacted from logs, MLflow params and artifacts.
    s3_access_key: str = ""
    s3_secret_key: str = ""
    # -- Attempts per S3 request (pyarrow's AWS standard retry strategy),
    #    for throttling (503 SlowDown) and dropped connections.
    s3_max_attempts: int = 10
