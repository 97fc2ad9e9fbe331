"""Storage credentials the way AWS tools find them: temporary ones with their session token (here
from MinIO's own STS, AssumeRole), a shared credentials file with profiles — for the upload, the
trainer and the collection alike."""

from __future__ import annotations

import sys

import pytest
from minio.credentials import AssumeRoleProvider
from support import SMALL_TRAINING, Watched, run_script, s3, wait_ok

pytestmark = pytest.mark.slow


def without_credentials(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith("AWS_")}


@pytest.fixture()
def temporary(s3_env) -> dict:
    """AWS_* of temporary credentials from MinIO's STS, as `aws sts assume-role` would give them."""
    sts = AssumeRoleProvider(sts_endpoint=s3_env["S3_ENDPOINT_URL"], access_key=s3_env["AWS_ACCESS_KEY_ID"],
                             secret_key=s3_env["AWS_SECRET_ACCESS_KEY"], duration_seconds=3600)  # fmt: skip
    credentials = sts.retrieve()
    assert credentials.session_token
    return {"AWS_ACCESS_KEY_ID": credentials.access_key, "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
            "AWS_SESSION_TOKEN": credentials.session_token}  # fmt: skip


def test_temporary_credentials_upload_train_and_collect(s3_env, temporary, synthetic_dir, run_dir, tmp_path):
    env = without_credentials(s3_env) | temporary
    dataset = s3("datasets/via-sts")
    uploaded = run_script(env, "upload_dataset.py", str(synthetic_dir), dataset)
    assert uploaded.returncode == 0, uploaded.stderr
    wait_ok(Watched([sys.executable, "-m", "training", "--data", dataset, "--output", run_dir, *SMALL_TRAINING,
                     "--epochs", "1"], env))  # fmt: skip
    collected = run_script(env, "collect_run.py", run_dir, str(tmp_path / "run"))
    assert collected.returncode == 0 and (tmp_path / "run" / "best.pt").exists(), collected.stderr

    tokenless = env | {"AWS_SESSION_TOKEN": ""}
    refused = run_script(tokenless, "collect_run.py", run_dir, str(tmp_path / "again"))
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr
    assert "InvalidTokenId" in refused.stderr or "InvalidAccessKeyId" in refused.stderr
    assert temporary["AWS_SECRET_ACCESS_KEY"] not in refused.stderr


def test_a_shared_credentials_file_and_profile_are_used(s3_env, synthetic_dir, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong-secret-1234\n\n"
                           f"[petal]\naws_access_key_id = {s3_env['AWS_ACCESS_KEY_ID']}\n"
                           f"aws_secret_access_key = {s3_env['AWS_SECRET_ACCESS_KEY']}\n")  # fmt: skip
    env = without_credentials(s3_env) | {"AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
    default = run_script(env, "upload_dataset.py", str(synthetic_dir), s3("datasets/via-file"))
    assert default.returncode != 0 and "InvalidAccessKeyId" in default.stderr
    profile = run_script(
        env | {"AWS_PROFILE": "petal"}, "upload_dataset.py", str(synthetic_dir), s3("datasets/via-file")
    )
    assert profile.returncode == 0, profile.stderr


def test_no_credentials_anywhere_is_one_line_saying_where_they_can_come_from(s3_env, tmp_path):
    env = without_credentials(s3_env) | {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "absent"), "HOME": str(tmp_path)}
    result = run_script(env, "collect_run.py", s3("runs/nothing"), str(tmp_path / "run"))
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "no storage credentials" in result.stderr and "IRSA" in result.stderr
