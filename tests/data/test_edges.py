"""Bad paths, buckets, endpoints and credentials: one-line errors naming them, before Ray starts."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from service.data import storage
from service.data.checks import DataInputError, check_data_root
from tests.data.shards import write_dataset
from tests.helpers import NO_AWS_CREDENTIALS, REPO, closed_port, without_aws_credentials


@pytest.fixture
def no_aws_env(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in NO_AWS_CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def test_check_data_root_local(tmp_path):
    with pytest.raises(DataInputError, match=r"data.root=/nonexistent/x does not exist"):
        check_data_root("/nonexistent/x", storage.S3Settings())
    with pytest.raises(DataInputError, match=r"holds no meta.json .*python -m service.ingest"):
        check_data_root(str(tmp_path), storage.S3Settings())
    with pytest.raises(DataInputError, match="data.root is empty"):
        check_data_root("", storage.S3Settings())
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataInputError, match="is not valid JSON"):
        check_data_root(str(tmp_path), storage.S3Settings())


def test_check_data_root_s3(s3_server, no_aws_env):
    good = s3_server.settings()
    bucket = s3_server.create_bucket()
    write_dataset(f"s3://{bucket}/ds", num_train=4, num_val=2, shard_size=4, s3=good)
    assert check_data_root(f"s3://{bucket}/ds", good).num_train == 4
    with pytest.raises(DataInputError, match=f"s3://{bucket}/empty holds no meta.json"):
        check_data_root(f"s3://{bucket}/empty", good)
    with pytest.raises(DataInputError, match="bucket 'nobucket-x' does not exist at http://127.0.0.1"):
        check_data_root("s3://nobucket-x/imagenet", good)
    keyless = storage.S3Settings(endpoint=s3_server.endpoint_url)
    with pytest.raises(DataInputError, match="no S3 credentials .*AWS_ACCESS_KEY_ID .*data.s3_access_key"):
        check_data_root(f"s3://{bucket}/ds", keyless)
    wrong = storage.S3Settings(endpoint=f"http://127.0.0.1:{closed_port()}", access_key="a", secret_key="b")
    with pytest.raises(DataInputError, match=f"cannot connect to the S3 endpoint {wrong.endpoint} .*data.s3_endpoint"):
        check_data_root(f"s3://{bucket}/ds", wrong)


def _run(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_ingest_cli_edge_errors_are_one_line_without_traceback(s3_server, tmp_path):
    """The cases a new user meets, each as a real `python -m service.ingest` process (run at once)."""
    base_env = without_aws_credentials()
    keys = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    bucket = s3_server.create_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="raw/train/n01440764/a.JPEG", Body=b"x")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "holiday.jpg").write_bytes(b"mine")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "raw" / "train" / "n01440764").mkdir(parents=True)
    endpoint = f"s3_endpoint={s3_server.endpoint_url}"
    cases = {  # name: (arguments, extra environment, text the one line must hold)
        "missing source": (["source=/nonexistent", f"dest={tmp_path}/out"], {}, "source=/nonexistent does not exist"),
        "non-empty dest": ([f"source={tmp_path}/raw", f"dest={tmp_path}/used"], {},
                           "is not empty and holds no ingest output"),
        "unwritable dest": ([f"source={tmp_path}/raw", f"dest={tmp_path}/a_file/x"], {}, "cannot be created"),
        "S3 without credentials": ([f"source=s3://{bucket}/raw", f"dest=s3://{bucket}/out", endpoint], {},
                                   "no S3 credentials for s3://"),
        "wrong endpoint": ([f"source=s3://{bucket}/raw", f"dest=s3://{bucket}/out",
                            f"s3_endpoint=http://127.0.0.1:{closed_port()}"], keys,
                           "cannot connect to the S3 endpoint http://127.0.0.1:"),
        "missing bucket": (["source=s3://no-such-bucket/raw", f"dest={tmp_path}/out", endpoint], keys,
                           "bucket 'no-such-bucket' does not exist"),
    }
    procs = {name: _run(["service.ingest", *argv], {**base_env, **extra}) for name, (argv, extra, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, proc.returncode, err)
        assert len(lines) == 1 and cases[name][2] in lines[0], (name, err)
        assert "Traceback" not in err + out, name
    assert not (tmp_path / "out").exists(), "nothing written"


def test_ingest_errors_in_process(tmp_path, capsys):
    """The same checks through `service.ingest.main` (no process start): more cases, cheaply."""
    from service.config import ConfigError
    from service.data.ingest import IngestConfig
    from service.ingest import main

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "nolayout").mkdir()
    (tmp_path / "nolayout" / "README.md").write_text("x")
    (tmp_path / "raw" / "train").mkdir(parents=True)
    for source, dest, text in ((f"{tmp_path}/a_file", f"{tmp_path}/o", "source=.*a_file is a file"),
                               (f"{tmp_path}/nolayout", f"{tmp_path}/o", "cannot detect the layout of .*nolayout"),
                               (f"{tmp_path}/raw", f"{tmp_path}/a_file", "dest=.*a_file is a file"),
                               (f"{tmp_path}/raw", f"{tmp_path}/raw", "is the source folder itself")):
        assert main(IngestConfig(source=source, dest=dest)) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert re.search(text, err), err
    with pytest.raises(ConfigError, match="quality=101 must be >= 1 and <= 100"):
        IngestConfig(source="a", dest="b", quality=101).validate()
