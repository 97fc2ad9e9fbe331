"""Storage credentials the way AWS tools find them: temporary ones with their session token (here
from MinIO's own STS, AssumeRole), a shared credentials file with profiles, the platform's identity
(the container endpoint of EKS Pod Identity and ECS, the EC2 metadata service, IRSA's web identity)
riding out the platform's outages — for the upload, the trainer and the collection alike."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from minio.credentials import AssumeRoleProvider
from minio.time import to_iso8601utc
from support import SMALL_TRAINING, Watched, run_script, s3, wait_ok


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_no_credentials_anywhere_is_one_line_saying_where_they_can_come_from(s3_env, tmp_path):
    env = without_credentials(s3_env) | {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "absent"), "HOME": str(tmp_path)}
    result = run_script(env, "collect_run.py", s3("runs/nothing"), str(tmp_path / "run"))
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "no storage credentials" in result.stderr and "IRSA" in result.stderr


class Platform(ThreadingHTTPServer):
    """The cloud's side of a pod's identity, on loopback (AWS itself is out of reach here): the container
    credentials endpoint (EKS Pod Identity, ECS), the EC2 metadata service and STS's
    AssumeRoleWithWebIdentity (IRSA), each handing out temporary credentials that MinIO's own STS
    issued. After `outage(seconds)`, every answer is a 503 for that long from the next request on
    (forever with None), as when the metadata service or STS has a bad minute."""

    def __init__(self, credentials: dict):
        super().__init__(("127.0.0.1", 0), PlatformHandler)
        self.credentials, self.refused = credentials, 0
        self.down_for: float | None = 0.0
        self.down_until: float | None = None
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def outage(self, seconds: float | None) -> None:
        self.down_for, self.down_until, self.refused = seconds, None, 0

    def down(self) -> bool:
        if self.down_for is None:
            return True
        if self.down_until is None:
            self.down_until = time.monotonic() + self.down_for
        return time.monotonic() < self.down_until


class PlatformHandler(BaseHTTPRequestHandler):
    ROLE = "/latest/meta-data/iam/security-credentials/"

    def answer(self, body: str, content_type: str = "application/json") -> None:
        if self.server.down():
            self.server.refused += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self):  # IMDSv2's session token
        self.answer("imds-session-token", "text/plain")

    def do_GET(self):
        c = self.server.credentials
        if self.path == self.ROLE:
            self.answer("petal-node-role", "text/plain")
        else:  # the container endpoint, or the role's credentials from the metadata service
            self.answer(json.dumps({"Code": "Success", "AccessKeyId": c["key"], "SecretAccessKey": c["secret"],
                                    "Token": c["token"], "Expiration": c["expiration"]}))  # fmt: skip

    def do_POST(self):  # STS: AssumeRoleWithWebIdentity
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        c = self.server.credentials
        ns = "https://sts.amazonaws.com/doc/2011-06-15/"
        self.answer(f'<AssumeRoleWithWebIdentityResponse xmlns="{ns}"><AssumeRoleWithWebIdentityResult><Credentials>'
                    f"<AccessKeyId>{c['key']}</AccessKeyId><SecretAccessKey>{c['secret']}</SecretAccessKey>"
                    f"<SessionToken>{c['token']}</SessionToken><Expiration>{c['expiration']}</Expiration>"
                    "</Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
                    "text/xml")  # fmt: skip

    def log_message(self, *args):
        pass


@pytest.fixture()
def platform(s3_env):
    sts = AssumeRoleProvider(sts_endpoint=s3_env["S3_ENDPOINT_URL"], access_key=s3_env["AWS_ACCESS_KEY_ID"],
                             secret_key=s3_env["AWS_SECRET_ACCESS_KEY"], duration_seconds=3600)  # fmt: skip
    issued = sts.retrieve()
    server = Platform({"key": issued.access_key, "secret": issued.secret_key, "token": issued.session_token,
                       "expiration": to_iso8601utc(issued.expiration)})  # fmt: skip
    yield server
    server.shutdown()


PROJECTED_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwZXRhbCJ9.c2lnbmF0dXJl"  # what the cluster mounts for IRSA


def identity_env(s3_env: dict, platform: Platform, kind: str, tmp_path) -> dict:
    """A pod's environment with only its platform identity to go by (no keys, no credentials file)."""
    env = without_credentials(s3_env) | {"HOME": str(tmp_path), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    if kind == "container endpoint":
        return env | {"AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{platform.url}/v2/credentials/petal"}
    if kind == "instance metadata":
        return env | {"AWS_EC2_METADATA_SERVICE_ENDPOINT": platform.url}
    token = tmp_path / "token"
    token.write_text(PROJECTED_TOKEN)
    return env | {"AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/petal",
                  "AWS_ENDPOINT_URL_STS": platform.url}  # fmt: skip


@pytest.mark.parametrize("kind", ["container endpoint", "instance metadata", "web identity"])
def test_a_platform_identity_that_fails_for_a_while_is_ridden_out(kind, s3_env, platform, synthetic_dir, tmp_path):
    env = identity_env(s3_env, platform, kind, tmp_path) | {"PETAL_S3_RETRY_SECONDS": "60"}
    platform.outage(2)
    uploaded = run_script(env, "upload_dataset.py", str(synthetic_dir), s3(f"datasets/via-{kind.replace(' ', '-')}"))
    assert uploaded.returncode == 0, uploaded.stderr
    assert platform.refused > 0, "the outage was never met"
    assert "retrying in" in uploaded.stderr and "gave no credentials" in uploaded.stderr
    for secret in (platform.credentials["secret"], platform.credentials["token"], PROJECTED_TOKEN):
        assert secret not in uploaded.stderr + uploaded.stdout


@pytest.mark.slow
def test_training_rides_out_8_seconds_of_503_from_the_container_endpoint(s3_env, platform, synthetic_dataset,
                                                                        run_dir, tmp_path):  # fmt: skip
    env = identity_env(s3_env, platform, "container endpoint", tmp_path) | {"PETAL_S3_RETRY_SECONDS": "60"}
    platform.outage(8)
    wait_ok(Watched([sys.executable, "-m", "training", "--data", synthetic_dataset, "--output", run_dir,
                     *SMALL_TRAINING, "--epochs", "1"], env))  # fmt: skip
    assert platform.refused > 0


def test_a_platform_identity_down_for_good_is_an_outage_not_a_missing_credential(s3_env, platform, tmp_path):
    """Exit 201 (retried by restartPolicy ExitCode), not 5 (final): the pod's identity exists, it is down."""
    env = identity_env(s3_env, platform, "container endpoint", tmp_path) | {"PETAL_S3_RETRY_SECONDS": "2"}
    platform.outage(None)
    result = Watched([sys.executable, "-m", "training", "--data", s3("datasets/any"), "--output", s3("runs/any")], env)
    assert result.wait(120) == 201, "\n".join(result.stderr[-10:])
    assert "gave no credentials" in result.stderr[-1] and "still failing after 2s" in result.stderr[-1]
