"""Configuration: composition, validation, and failing before anything starts."""

import subprocess
import sys

import pytest

from service.config import ConfigError, from_dict, to_dict
from service.hydra_app import compose
from service.launch import check_layout
from service.train.build import base_lr
from tests.helpers import closed_port, without_aws_credentials


def test_user_facing_keys_compose():
    cfg = compose(
        [
            "experiment=smoke",
            "data.resize_size=256",
            "model=alexnet_owt",
            "parallel.towers=1",
            "parallel.replicas=2",
            "data.root=s3://bucket/imagenet",
            "train.epochs=3",
            "train.batch_size=256",
            "recipe=fast",
            "cluster=gpu",
            "tracking.uri=http://127.0.0.1:5000",
            "tracking.experiment=exp",
            "run.name=r1",
            "storage.path=s3://bucket/ckpt",
        ]
    )
    assert cfg.model.name == "alexnet_owt" and cfg.parallel.replicas == 2
    assert cfg.cluster.use_gpu and cfg.recipe.bf16 and cfg.recipe.name == "fast"
    assert cfg.data.root == "s3://bucket/imagenet" and cfg.storage.path == "s3://bucket/ckpt"
    # fast recipe: linear scaling from 0.01 per 128 images.
    assert base_lr(cfg) == pytest.approx(0.02)


def test_paper_recipe_defaults():
    cfg = compose([])
    assert (cfg.model.name, cfg.parallel.towers, cfg.train.batch_size) == ("alexnet", 2, 128)
    assert (cfg.recipe.lr, cfg.recipe.momentum, cfg.recipe.weight_decay) == (0.01, 0.9, 0.0005)
    assert cfg.recipe.schedule == "plateau" and cfg.recipe.plateau_max_drops == 3 and cfg.train.epochs == 90


def test_config_round_trips_through_plain_dicts():
    cfg = compose(["experiment=demo"])
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict({**to_dict(cfg), "bogus": 1})


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.towers=3", "parallel.towers=3 is not allowed; choose one of [1, 2, 4, 8]"),
        ("parallel.replicas=0", "parallel.replicas=0 must be > 0"),
        ("recipe.schedule=weekly", "recipe.schedule='weekly' is not allowed; choose one of"),
        ("data.eval_crops=5", "data.eval_crops=5 is not allowed; choose one of [1, 10]"),
        ("data.augmentation=mixup", "data.augmentation='mixup' is not allowed"),
        ("model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),
        ("train.batch_size=0", "train.batch_size=0 must be > 0"),
        ("data.resize_size=200", "data.resize_size=200 is smaller than model.image_size=224"),
    ],
)
def test_invalid_values_name_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError) as error:
        compose([override])
    assert message in str(error.value)


def test_batch_must_divide_over_replicas():
    with pytest.raises(ConfigError, match=r"train.batch_size=130 does not divide over parallel.replicas=4.*128"):
        compose(["parallel.replicas=4", "train.batch_size=130"])


def test_model_that_cannot_split_fails_before_start():
    cfg = compose(["parallel.towers=8", "model.num_classes=5"])
    with pytest.raises(ValueError, match="num_classes=5 is smaller than towers=8"):
        check_layout(cfg, num_classes=5)


# Each case a real `python -m service.train` (all started at once): exit 2 and one
# line on stderr, before Ray. The address points at a closed port: had the job
# tried to reach Ray it would fail with a connection error after a long
# timeout, not with this message.
def test_cli_errors_are_one_line_exit_2_before_ray(tmp_path):
    (tmp_path / "not-ingested").mkdir()
    dead = f"127.0.0.1:{closed_port()}"
    cases = {  # name: (overrides, text the one line must hold)
        "towers": (["parallel.towers=3"], "configuration error: parallel.towers=3 is not allowed"),
        "split": (["parallel.towers=4", "model.num_classes=2"], "num_classes=2 is smaller than towers=4"),
        "missing root": (["data.root=/nonexistent/imagenet"], "error: data.root=/nonexistent/imagenet does not exist"),
        "root not ingested": ([f"data.root={tmp_path}/not-ingested"], "holds no meta.json"),
        "S3 without credentials": (["data.root=s3://imagenet/train-ready", f"data.s3_endpoint=http://{dead}"],
                                   "error: no S3 credentials for s3://imagenet/train-ready"),
    }
    env = without_aws_credentials()
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "service.train", *overrides, f"cluster.address={dead}",
                                f"hydra.run.dir={tmp_path / name.replace(' ', '-')}"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (overrides, _) in cases.items()
    }
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert process.returncode == 2, (name, process.returncode, err[-2000:])
        assert len(lines) == 1 and cases[name][1] in lines[0], (name, err[-2000:])
        assert "Connecting to existing Ray cluster" not in out + err and "Traceback" not in err, name
