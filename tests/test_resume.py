"""Resume decided on the driver: the newest *complete* checkpoint is found in
storage, and a resume that would change the training stops before any worker
starts, naming the keys. Checkpoint folders here are written by the
service's own checkpoint module."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from service.config import ConfigError, to_dict
from service.hydra_app import compose
from service.model import ReferenceAlexNet, alexnet_spec
from service.parallel.sharding import reference_to_tower
from service.resume import (
    changed_training_keys, check_resume, checkpoint_dir_name, find_resume_point, remove_untracked_checkpoints,
)
from service.tracking.redact import redact
from service.train import checkpoint as ckpt

FACTS = {"num_classes": 4, "classes_digest": "abc", "steps_per_epoch": 10}


def _config(*overrides: str) -> dict:
    return redact(to_dict(compose(["experiment=smoke", *overrides])))


def _write(run_dir, epoch: int, step: int, config: dict, towers: int = 2) -> str:
    folder = run_dir / checkpoint_dir_name(epoch, step)
    folder.mkdir(parents=True)
    spec = alexnet_spec(num_classes=4, image_size=64, towers=towers, width_mult=0.25)
    state = ReferenceAlexNet(spec).state_dict()
    shards = [ckpt.write_tower_shard(folder, t, {"model": reference_to_tower(state, spec, t)}) for t in range(towers)]
    ckpt.write_progress(folder, {"epoch": epoch, "step": step, "towers": towers, "spec": ckpt.spec_to_dict(spec),
                                 "config": config, "shards": shards, **FACTS})
    return str(folder)


def test_the_newest_complete_checkpoint_is_chosen_and_incomplete_ones_are_named(tmp_path):
    config = _config()
    _write(tmp_path, 0, 4, config)
    cut_shard = _write(tmp_path, 0, 8, config)
    no_progress = _write(tmp_path, 1, 10, config)
    truncated_progress = _write(tmp_path, 1, 12, config)
    with open(f"{cut_shard}/tower_1.pt", "r+b") as shard:
        shard.truncate(100)  # an upload cut short
    (tmp_path / checkpoint_dir_name(1, 10) / ckpt.PROGRESS_FILE).unlink()
    text = (tmp_path / checkpoint_dir_name(1, 12) / ckpt.PROGRESS_FILE).read_text()
    (tmp_path / checkpoint_dir_name(1, 12) / ckpt.PROGRESS_FILE).write_text(text[: len(text) // 2])
    (tmp_path / "not-a-checkpoint").mkdir()
    said = []
    point = find_resume_point(pafs.LocalFileSystem(), str(tmp_path), log=said.append)
    assert point is not None and point.step == 4 and point.path.endswith(checkpoint_dir_name(0, 4))
    assert [line.split(": ", 1)[0] for line in said] == [
        f"[resume] skipping incomplete checkpoint {folder}" for folder in (truncated_progress, no_progress, cut_shard)
    ]
    assert "tower_1.pt has 100 bytes, expected" in said[2]
    assert find_resume_point(pafs.LocalFileSystem(), str(tmp_path / "no-such-run")) is None


def test_a_finished_run_keeps_only_the_checkpoints_ray_tracks(tmp_path):
    """Folders an earlier, killed attempt left (Ray Train's manager of the finished
    attempt never knew them) go; the tracked ones, other files and folders stay."""
    for epoch, step in ((1, 10), (1, 12), (2, 20), (2, 28), (3, 30)):
        (tmp_path / checkpoint_dir_name(epoch, step)).mkdir()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    (tmp_path / "unsent_metrics-1.jsonl").write_text("")
    tracked = [str(tmp_path / checkpoint_dir_name(e, s)) for e, s in ((1, 10), (2, 20), (3, 30))]
    fs = pafs.LocalFileSystem()
    assert remove_untracked_checkpoints(fs, str(tmp_path), []) == []  # nothing tracked: nothing to go by
    removed = remove_untracked_checkpoints(fs, str(tmp_path), tracked + [tracked[-1] + "/"])
    assert [p.rsplit("/", 1)[-1] for p in removed] == [checkpoint_dir_name(1, 12), checkpoint_dir_name(2, 28)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [checkpoint_dir_name(1, 10), checkpoint_dir_name(2, 20), checkpoint_dir_name(3, 30),
         "checkpoint_manager_snapshot.json", "unsent_metrics-1.jsonl"])


def test_a_shard_that_does_not_match_its_digest_is_refused(tmp_path):
    folder = _write(tmp_path, 1, 10, _config())
    data = bytearray(open(f"{folder}/tower_0.pt", "rb").read())
    data[-40] ^= 0xFF  # same size, different bytes
    open(f"{folder}/tower_0.pt", "wb").write(bytes(data))
    with pytest.raises(ckpt.IncompleteCheckpoint, match="does not match the digest"):
        ckpt.load_reference_state(folder)


def test_run_management_keys_may_change_training_keys_may_not():
    saved = _config()
    allowed = _config("train.epochs=5", "train.log_every_steps=3", "tracking.uri=http://x:5000", "data.root=/moved",
                      "data.s3_endpoint=http://minio:9000", "cluster.cpus_per_worker=2", "storage.path=/other")
    assert changed_training_keys(saved, allowed) == []
    changed = changed_training_keys(saved, _config("recipe.lr=0.05", "parallel.towers=4", "train.batch_size=64",
                                                   "data.hflip=false"))
    assert [line.split(":")[0] for line in changed] == [
        "data.hflip", "parallel.towers", "recipe.lr", "train.batch_size"]
    assert "parallel.towers: 2 -> 4" in changed


def test_check_resume_names_what_differs_and_honours_run_resume(tmp_path):
    saved = _config()
    _write(tmp_path, 1, 10, saved)
    point = find_resume_point(pafs.LocalFileSystem(), str(tmp_path))
    check_resume(point, "auto", "r", saved, FACTS)  # same setup: resumes
    with pytest.raises(ConfigError, match=r"run.name=r would resume from step 10 .*recipe.lr: 0.01 -> 0.1"):
        check_resume(point, "auto", "r", _config("recipe.lr=0.1"), FACTS)
    with pytest.raises(ConfigError, match=r"num_classes: 4 -> 10"):
        check_resume(point, "auto", "r", saved, {**FACTS, "num_classes": 10})
    with pytest.raises(ConfigError, match="run.resume=never"):
        check_resume(point, "never", "r", saved, FACTS)
    with pytest.raises(ConfigError, match="run.resume=require but run.name=fresh has no complete checkpoint"):
        check_resume(None, "require", "fresh", saved, FACTS)
    check_resume(None, "auto", "fresh", saved, FACTS)  # nothing to resume: starts


def test_another_tower_count_fails_like_any_layout_change(tmp_path):
    saved = _config()
    _write(tmp_path, 1, 10, saved, towers=2)
    point = find_resume_point(pafs.LocalFileSystem(), str(tmp_path))
    with pytest.raises(ConfigError, match=r"parallel.towers: 2 -> 1"):
        check_resume(point, "auto", "r", _config("parallel.towers=1"), FACTS)
