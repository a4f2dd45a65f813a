"""Readers for the raw ImageNet layouts: what the inputs are and their labels.

Accepted layouts under a source root (local folder, file:// or s3://):

- `imagefolder`: `train/<wnid>/*`, `val/<wnid>/*`; optional synset mapping
  `LOC_synset_mapping.txt` or `synsets.txt` at the root (`<wnid> <names>` lines).
- `ilsvrc-tars`: the official archives `ILSVRC2012_img_train.tar` (one inner
  `<wnid>.tar` per class), `ILSVRC2012_img_val.tar` (flat
  `ILSVRC2012_val_000NNNNN.JPEG`) and the devkit, either extracted
  (`ILSVRC2012_devkit_t12/`) or as `ILSVRC2012_devkit_t12.tar.gz`. From the
  devkit we read `data/ILSVRC2012_validation_ground_truth.txt` (line i = the
  1-based ILSVRC2012_ID of val image i) and the synsets: `data/meta.mat`
  (MATLAB; fields ILSVRC2012_ID, WNID, words, num_children; read with scipy
  when installed) or, preferred when present, a plain text `data/synsets.txt`
  with lines `<ILSVRC2012_ID> <wnid> <words>` (or `<wnid> <words>`, the line
  number being the id).
- `kaggle` (ImageNet Object Localization Challenge): `ILSVRC/Data/CLS-LOC/train/<wnid>/*`,
  `ILSVRC/Data/CLS-LOC/val/*.JPEG`, `LOC_synset_mapping.txt`,
  `LOC_val_solution.csv` (first token of PredictionString is the wnid).

Classes: the training wnids that look like wnids (`n` + 8 digits) and, when a
synset mapping exists, appear in it; label = index in sorted order. Names come
from the mapping (first synonym), else a built-in table, else the wnid.

Every file below the train/val folders (or member of the archives) is an
input; anything that cannot get a label is quarantined here with a reason
(`unknown_wnid`, `no_ground_truth`), the rest is decoded at ingest.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from dataclasses import dataclass, field
from typing import Optional

from service.data import formats, storage
from service.data.checks import DataInputError
from service.data.options import LAYOUTS
from service.data.wnids import KNOWN_NAMES

WNID_RE = re.compile(r"^n\d{8}$")
VAL_INDEX_RE = re.compile(r"ILSVRC2012_val_(\d{8})")
KAGGLE_BASE = "ILSVRC/Data/CLS-LOC"
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT_DIR, DEVKIT_TGZ = "ILSVRC2012_devkit_t12", "ILSVRC2012_devkit_t12.tar.gz"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"


@dataclass
class Item:
    """One input image: where its bytes are and what it should be labelled."""

    key: str      # stable id: the path inside the raw layout
    split: str    # "train" or "val"
    wnid: str     # "" when unknown
    path: str     # URI of the file holding the bytes
    offset: int = -1  # byte offset inside `path` (tar member); -1 = whole file
    size: int = 0
    reason: str = ""  # set when quarantined at listing time
    detail: str = ""

    @property
    def source(self) -> str:
        return self.path if self.offset < 0 else f"{self.path}#{self.key.split('/', 1)[-1]}"


@dataclass
class TarRange:
    """A tar archive (or an inner tar inside one) whose members are inputs."""

    path: str
    offset: int
    size: int
    split: str
    wnid: str      # train: the class of the inner tar; val: ""
    key_prefix: str


@dataclass
class Listing:
    """The result of reading a layout: classes, inputs, archives still to index."""

    layout: str
    wnids: list[str]
    names: list[str]
    items: list[Item] = field(default_factory=list)
    tar_ranges: list[TarRange] = field(default_factory=list)
    # ilsvrc-tars: ILSVRC2012_ID -> wnid and the ground truth, to label val members.
    id_to_wnid: dict[int, str] = field(default_factory=dict)
    val_ground_truth: list[int] = field(default_factory=list)


def detect_layout(rels: set[str], source: str = "the source") -> str:
    """Guess the layout from the relative file paths below the root."""
    if any(r.startswith(KAGGLE_BASE + "/") for r in rels):
        return "kaggle"
    if TRAIN_TAR in rels or VAL_TAR in rels:
        return "ilsvrc-tars"
    if any(r.startswith("train/") for r in rels):
        return "imagefolder"
    raise DataInputError(
        f"cannot detect the layout of {source}: expected ILSVRC/Data/CLS-LOC/ (kaggle), "
        f"{TRAIN_TAR} (ilsvrc-tars) or train/<wnid>/ (imagefolder) below it"
    )


def parse_mapping(text: str) -> dict[str, str]:
    """`<wnid> <name, synonym, ...>` lines -> {wnid: first synonym}."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if parts and WNID_RE.match(parts[0]):
            out[parts[0]] = parts[1].split(",")[0].strip() if len(parts) > 1 else parts[0]
    return out


def choose_classes(train_wnids: set[str], mapping: Optional[dict[str, str]]) -> tuple[list[str], list[str]]:
    """Sorted class wnids and their names (see module docstring for the rule)."""
    wnids = sorted(w for w in train_wnids if WNID_RE.match(w) and (mapping is None or w in mapping))
    if not wnids:
        raise DataInputError(f"no class folders found (training wnids seen: {sorted(train_wnids)[:10]})")
    names = [(mapping or {}).get(w) or KNOWN_NAMES.get(w, w) for w in wnids]
    return wnids, names


def _label_reason(wnid: str, classes: set[str]) -> tuple[str, str]:
    if wnid in classes:
        return "", ""
    return formats.UNKNOWN_WNID, f"wnid {wnid!r} is not a training class"


def list_layout(source: str, layout: str = "auto", s3: storage.S3Settings = storage.DEFAULT_S3) -> Listing:
    """List the inputs of the raw dataset at `source` (one recursive listing)."""
    entries = storage.list_files(source, s3)
    by_rel = {e.rel: e for e in entries}
    if layout == "auto":
        layout = detect_layout(set(by_rel), source)
    if layout not in LAYOUTS:
        raise DataInputError(f"layout={layout!r} is not allowed; choose one of auto, {', '.join(LAYOUTS)}")
    if layout == "ilsvrc-tars":
        return _list_ilsvrc(source, by_rel, s3)
    base = KAGGLE_BASE + "/" if layout == "kaggle" else ""
    mapping = None
    for name in ("LOC_synset_mapping.txt", "synsets.txt"):
        if name in by_rel:
            mapping = parse_mapping(storage.read_bytes(by_rel[name].uri, s3).decode("utf-8", "replace"))
            break
    train = [e for e in entries if e.rel.startswith(base + "train/")]
    val = [e for e in entries if e.rel.startswith(base + "val/")]
    if not train:
        raise DataInputError(f"no files below {storage.join(source, base + 'train')}")
    folder_of = {e.rel: e.rel[len(base):].split("/") for e in train + val}
    train_wnids = {parts[1] for e in train if len(parts := folder_of[e.rel]) > 2}
    wnids, names = choose_classes(train_wnids, mapping)
    classes = set(wnids)
    listing = Listing(layout, wnids, names)
    for e in train:
        parts = folder_of[e.rel]
        wnid = parts[1] if len(parts) > 2 else ""
        reason, detail = _label_reason(wnid, classes) if wnid else (formats.UNKNOWN_WNID, "file outside a class folder")
        listing.items.append(Item(e.rel, "train", wnid, e.uri, size=e.size, reason=reason, detail=detail))
    solution = {}
    if layout == "kaggle" and "LOC_val_solution.csv" in by_rel:
        text = storage.read_bytes(by_rel["LOC_val_solution.csv"].uri, s3).decode("utf-8", "replace")
        for row in csv.DictReader(io.StringIO(text)):
            tokens = (row.get("PredictionString") or "").split()
            if tokens:
                solution[row["ImageId"]] = tokens[0]
    for e in val:
        parts = folder_of[e.rel]
        if layout == "imagefolder":
            wnid = parts[1] if len(parts) > 2 else ""
        else:
            wnid = solution.get(parts[-1].rsplit(".", 1)[0], "")
        if wnid:
            reason, detail = _label_reason(wnid, classes)
        else:
            reason, detail = formats.NO_GROUND_TRUTH, "no label for this validation image"
        listing.items.append(Item(e.rel, "val", wnid, e.uri, size=e.size, reason=reason, detail=detail))
    return listing


def _read_devkit(source: str, by_rel: dict, s3: storage.S3Settings) -> dict[str, bytes]:
    """{relative path inside the devkit: bytes} for the files we use."""
    wanted = (GROUND_TRUTH, "data/synsets.txt", "data/meta.mat")
    out = {}
    for rel in wanted:
        entry = by_rel.get(f"{DEVKIT_DIR}/{rel}")
        if entry is not None:
            out[rel] = storage.read_bytes(entry.uri, s3)
    if not out and DEVKIT_TGZ in by_rel:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(by_rel[DEVKIT_TGZ].uri, s3)), mode="r:gz") as tar:
            for member in tar.getmembers():
                rel = member.name.split("/", 1)[-1]
                if rel in wanted and member.isfile():
                    out[rel] = tar.extractfile(member).read()
    return out


def parse_synsets_txt(text: str) -> dict[int, tuple[str, str]]:
    """`<id> <wnid> <words>` or `<wnid> <words>` lines -> {ILSVRC2012_ID: (wnid, first synonym)}."""
    out = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.strip().split(None, 2)
        if not parts:
            continue
        if parts[0].isdigit() and len(parts) > 1:
            ident, wnid, words = int(parts[0]), parts[1], parts[2] if len(parts) > 2 else parts[1]
        else:
            ident, wnid, words = number, parts[0], " ".join(parts[1:]) or parts[0]
        out[ident] = (wnid, words.split(",")[0].strip())
    return out


def parse_meta_mat(data: bytes) -> dict[int, tuple[str, str]]:
    """meta.mat -> {ILSVRC2012_ID: (wnid, first synonym)} for the leaf synsets."""
    try:
        import scipy.io
    except ImportError as err:
        raise DataInputError(
            "the devkit has only meta.mat, which needs scipy; install scipy or add "
            f"{DEVKIT_DIR}/data/synsets.txt with lines '<ILSVRC2012_ID> <wnid> <words>'"
        ) from err
    synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
    out = {}
    for row in synsets.reshape(-1):
        children = int(row["num_children"]) if "num_children" in synsets.dtype.names else 0
        if children == 0:
            out[int(row["ILSVRC2012_ID"])] = (str(row["WNID"]), str(row["words"]).split(",")[0].strip())
    return out


def _list_ilsvrc(source: str, by_rel: dict, s3: storage.S3Settings) -> Listing:
    devkit = _read_devkit(source, by_rel, s3)
    if "data/synsets.txt" in devkit:
        synsets = parse_synsets_txt(devkit["data/synsets.txt"].decode("utf-8", "replace"))
    elif "data/meta.mat" in devkit:
        synsets = parse_meta_mat(devkit["data/meta.mat"])
    else:
        synsets = {}
    mapping = {wnid: name for wnid, name in synsets.values()} or None
    ground_truth = [int(x) for x in devkit.get(GROUND_TRUTH, b"").decode().split()]
    if TRAIN_TAR not in by_rel:
        raise DataInputError(f"{storage.join(source, TRAIN_TAR)} not found")
    train_entry = by_rel[TRAIN_TAR]
    # The outer tar has ~1000 members: hop over headers with random access
    # (small reads: the whole pass is retried as `storage.with_retries` says).
    items, inner = storage.with_retries(lambda: _outer_train_tar(train_entry.uri, s3), s3.max_attempts)
    wnids, names = choose_classes({w for w, *_ in inner}, mapping)
    listing = Listing("ilsvrc-tars", wnids, names, items=items)
    listing.id_to_wnid = {ident: wnid for ident, (wnid, _name) in synsets.items()}
    listing.val_ground_truth = ground_truth
    for wnid, offset, size, key in inner:
        listing.tar_ranges.append(TarRange(train_entry.uri, offset, size, "train", wnid, key[: -len(".tar")]))
    if VAL_TAR in by_rel:
        val_entry = by_rel[VAL_TAR]
        listing.tar_ranges.append(TarRange(val_entry.uri, 0, val_entry.size, "val", "", "val"))
    return listing


def _outer_train_tar(uri: str, s3: storage.S3Settings) -> tuple[list[Item], list[tuple[str, int, int, str]]]:
    """Non-class members (as quarantined items) and inner class tars (wnid, offset, size, key)."""
    fs, path = storage.arrow_filesystem(uri, s3)
    items, inner = [], []
    with fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem = member.name.rsplit("/", 1)[-1]
            key = f"train/{member.name}"
            if stem.endswith(".tar"):
                inner.append((stem[:-4], member.offset_data, member.size, key))
            else:
                items.append(Item(key, "train", "", uri, member.offset_data, member.size,
                                  formats.UNKNOWN_WNID, "not a class archive in the training tar"))
    return items, inner


@dataclass
class TarMember:
    """A regular file found inside a TarRange (offset absolute within the file)."""

    name: str
    offset: int
    size: int
    error: str = ""  # set (with name = archive) when the archive itself is broken


def index_tar_range(tar_range: TarRange, s3: storage.S3Settings = storage.DEFAULT_S3) -> list[TarMember]:
    """Stream through a (possibly inner) tar and return its file members.

    One sequential pass with large reads (cheap on S3); a broken archive
    yields the members read so far plus one entry with `error` set.
    """
    fs, path = storage.arrow_filesystem(tar_range.path, s3)
    members: list[TarMember] = []
    with fs.open_input_file(path) as handle:
        reader = storage.RangeReader(handle, tar_range.offset, tar_range.size, max_attempts=s3.max_attempts)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if member.isfile():
                        members.append(TarMember(member.name, tar_range.offset + member.offset_data, member.size))
        except (tarfile.TarError, EOFError, OSError) as err:
            members.append(TarMember(tar_range.key_prefix, tar_range.offset, tar_range.size, f"{type(err).__name__}: {err}"))
    return members


def items_from_members(listing: Listing, tar_range: TarRange, members: list[TarMember]) -> list[Item]:
    """Label the members of one indexed TarRange."""
    classes = set(listing.wnids)
    out = []
    for m in members:
        if m.error:
            out.append(Item(m.name, tar_range.split, tar_range.wnid, tar_range.path, m.offset, m.size,
                            formats.BAD_ARCHIVE, m.error[:200]))
            continue
        key = f"{tar_range.key_prefix}/{m.name}"
        if tar_range.split == "train":
            reason, detail = _label_reason(tar_range.wnid, classes)
            out.append(Item(key, "train", tar_range.wnid, tar_range.path, m.offset, m.size, reason, detail))
            continue
        match = VAL_INDEX_RE.search(m.name)
        index = int(match.group(1)) if match else 0
        if not 1 <= index <= len(listing.val_ground_truth):
            out.append(Item(key, "val", "", tar_range.path, m.offset, m.size, formats.NO_GROUND_TRUTH,
                            f"validation index {index or '?'} not in the ground truth "
                            f"({len(listing.val_ground_truth)} lines)"))
            continue
        ident = listing.val_ground_truth[index - 1]
        wnid = listing.id_to_wnid.get(ident, "")
        reason, detail = _label_reason(wnid, classes) if wnid else (
            formats.UNKNOWN_WNID, f"ILSVRC2012_ID {ident} is not in the devkit synsets")
        out.append(Item(key, "val", wnid, tar_range.path, m.offset, m.size, reason, detail))
    return out
