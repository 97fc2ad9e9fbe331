"""The one module that talks to object storage (MinIO or any S3 API), through the `minio` client.

Configured the way S3 tools are, from the environment:

    S3_ENDPOINT_URL        http://minio.example:9000 (scheme decides TLS; default https://s3.amazonaws.com)
    AWS_REGION             optional region

Credentials come the way the AWS tools find them, first found wins: AWS_ACCESS_KEY_ID +
AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN for temporary ones: assumed roles, SSO, STS); the shared
credentials file (AWS_SHARED_CREDENTIALS_FILE, default ~/.aws/credentials; AWS_PROFILE); then the
platform's identity — web identity (IRSA: AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN, STS at
AWS_ENDPOINT_URL_STS if set), the container endpoint (EKS Pod Identity, ECS) or the instance profile
(EC2 metadata, at AWS_EC2_METADATA_SERVICE_ENDPOINT if set). Temporary credentials are refreshed
before they expire; a platform identity that is configured (or answered once) and then fails for a
while is retried like any storage outage. Further settings:

    AWS_CA_BUNDLE          optional CA bundle for a private TLS endpoint
    S3_TLS_VERIFY          "false" turns certificate checks off (development only)
    PETAL_S3_RETRY_SECONDS how long transient failures are retried with backoff (default 300)

Transient failures (connection refused or reset, 5xx, MinIO still starting) are retried with
exponential backoff so a MinIO restart does not kill a training run; everything else (bad
credentials, missing bucket or object) fails at once with a one-line `StorageError`. No message
ever contains a credential.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

T = TypeVar("T")

# S3 error codes that say "try again later" rather than "you asked for something wrong".
TRANSIENT_S3_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "XMinioServerNotInitialized",
    "XMinioStorageFull",
}


class StorageError(Exception):
    """A storage failure worth one line to the user; never carries a credential."""

    def __init__(self, message: str, code: str | None = None, transient: bool = False):
        super().__init__(message)
        self.code = code  # the S3 error code, where the server gave one
        self.transient = transient  # still failing after the whole retry window: a restart may help

    def __reduce__(self):  # pickled whole (rank 0 hands its failure to every rank), code and class kept
        return type(self), (str(self), self.code, self.transient)


BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, *parts: str) -> S3Url:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return S3Url(self.bucket, key)


def parse_url(url: str) -> S3Url:
    """`s3://bucket/prefix` → S3Url; anything else is a clear ValueError."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url!r} is not an object-storage URL; expected s3://BUCKET/PREFIX")
    if not BUCKET_NAME.match(parsed.netloc):
        raise ValueError(f"{url!r} names bucket {parsed.netloc!r}: 3-63 lower-case letters, digits, '.' or '-'")
    return S3Url(parsed.netloc, parsed.path.strip("/"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_transient(err: Exception) -> bool:
    """Worth retrying: the service may come back (refused, reset, timed out, 5xx, a DNS server that did
    not answer). Not: a wrong key or secret, a certificate that does not verify, a host name that does
    not exist."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(err, IdentityUnavailable):
        return err.transient
    if isinstance(err, ServerError):
        return err.status_code >= 500
    if isinstance(err, InvalidResponseError):
        # A 5xx without an S3 XML body: a load balancer or proxy in front of the store answering for it.
        return err._code >= 500
    if isinstance(err, S3Error):
        return err.code in TRANSIENT_S3_CODES
    if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
        err = err.reason
    if isinstance(err, urllib3.exceptions.NameResolutionError):
        # EAI_AGAIN is the resolver timing out (a busy cluster DNS), not a name that does not exist.
        return getattr(err._reason, "errno", None) == socket.EAI_AGAIN
    if isinstance(err, urllib3.exceptions.SSLError | ssl.SSLError):
        return False
    return isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def describe_error(err: Exception) -> str:
    import urllib3
    from minio.error import S3Error

    if isinstance(err, S3Error):
        return f"{err.code}: {err.message}"
    if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
        err = err.reason
    return f"{type(err).__name__}: {err}".splitlines()[0]


class IdentityUnavailable(OSError):
    """The platform identity this process has (configured, or found answering) failed to give
    credentials: a storage outage like any other, transient when it says so (a 5xx, a timeout, a
    refused connection), so Storage retries it for PETAL_S3_RETRY_SECONDS."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


class Storage:
    def __init__(
        self,
        endpoint_url: str,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        credentials=None,
        ca_bundle: str | None = None,
        tls_verify: bool = True,
        retry_seconds: float = 300.0,
    ):
        parsed = urlparse(endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"S3_ENDPOINT_URL {endpoint_url!r} is not http(s)://HOST[:PORT]")
        if credentials is None and access_key and secret_key:
            from minio.credentials import StaticProvider

            credentials = StaticProvider(access_key, secret_key)
        self.endpoint_url = endpoint_url
        self.credentials = credentials
        self.retry_seconds = retry_seconds
        self._settings = dict(
            endpoint=parsed.netloc,
            credentials=credentials,
            region=region,
            secure=parsed.scheme == "https",
            cert_check=tls_verify,
        )
        self._ca_bundle = ca_bundle
        self._connect()

    def _connect(self) -> None:
        import certifi
        import urllib3
        from minio import Minio

        # Our own retry loop owns backoff; urllib3 must not hide failures behind its own.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=120),
            retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0),
            maxsize=16,
            cert_reqs="CERT_REQUIRED" if self._settings["cert_check"] else "CERT_NONE",
            ca_certs=self._ca_bundle or certifi.where(),
        )
        self.client = Minio(**self._settings, http_client=http)
        self._pid = os.getpid()

    @classmethod
    def from_env(cls) -> Storage:
        from training.credentials import CredentialChain

        env = os.environ
        return cls(
            endpoint_url=env.get("S3_ENDPOINT_URL", "https://s3.amazonaws.com"),
            credentials=CredentialChain(),
            region=env.get("AWS_REGION") or None,
            ca_bundle=env.get("AWS_CA_BUNDLE") or None,
            tls_verify=env.get("S3_TLS_VERIFY", "true").lower() not in ("0", "false", "no"),
            retry_seconds=float(env.get("PETAL_S3_RETRY_SECONDS", "300")),
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Runs one storage operation, retrying transient failures with capped exponential backoff."""
        import urllib3
        from minio.error import MinioException, S3Error

        if os.getpid() != self._pid:
            # A forked child (a DataLoader worker) must not share its parent's pooled sockets: two
            # processes reading one connection get each other's bytes.
            self._connect()
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        attempt = 1
        while True:
            try:
                return fn()
            except (MinioException, urllib3.exceptions.HTTPError, OSError) as err:
                transient = is_transient(err)
                if not transient or time.monotonic() + delay > deadline:
                    raise StorageError(
                        f"{what}: {describe_error(err)} (endpoint {self.endpoint_url})"
                        + (f"; still failing after {self.retry_seconds:.0f}s of retries" if transient else ""),
                        code=err.code if isinstance(err, S3Error) else None,
                        transient=transient,
                    ) from None
                print(
                    f"petal: {what}: {describe_error(err)}; retrying in {delay:.1f}s (attempt {attempt})",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(delay)
                delay = min(delay * 2, 15.0)
                attempt += 1

    def require_bucket(self, url: S3Url) -> None:
        if not self._call(f"checking bucket {url.bucket}", lambda: self.client.bucket_exists(url.bucket)):
            raise StorageError(f"bucket {url.bucket!r} does not exist at {self.endpoint_url} (needed for {url})")

    def ensure_bucket(self, url: S3Url) -> None:
        if not self._call(f"checking bucket {url.bucket}", lambda: self.client.bucket_exists(url.bucket)):
            self._call(f"creating bucket {url.bucket}", lambda: self.client.make_bucket(url.bucket))

    def read_bytes(self, url: S3Url) -> bytes:
        def get() -> bytes:
            response = self.client.get_object(url.bucket, url.key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"reading {url}", get)

    def write_bytes(self, url: S3Url, data: bytes, content_type: str = "application/octet-stream") -> None:
        """S3 makes an object visible only once all its bytes are stored: a reader never sees a torn write."""
        self._call(
            f"writing {url}",
            lambda: self.client.put_object(url.bucket, url.key, io.BytesIO(data), len(data), content_type),
        )

    def copy(self, source: S3Url, destination: S3Url) -> None:
        """A server-side copy: the bytes stay in the store (a best.pt of hundreds of MB is not sent twice)."""
        from minio.commonconfig import CopySource

        self._call(
            f"copying {source} to {destination}",
            lambda: self.client.copy_object(destination.bucket, destination.key, CopySource(source.bucket, source.key)),
        )

    def download(self, url: S3Url, path: Path) -> None:
        """Downloads to `path` through a temporary name of its own, so `path` is either absent or whole
        and a failed download leaves nothing behind (minio's fget_object leaves its `.part.minio`)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")

        def get() -> None:
            response = self.client.get_object(url.bucket, url.key)
            try:
                with open(partial, "wb") as f:
                    for chunk in response.stream(1 << 20):
                        f.write(chunk)
            finally:
                response.close()
                response.release_conn()

        try:
            self._call(f"downloading {url}", get)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def upload(self, path: Path, url: S3Url, content_type: str = "application/octet-stream") -> None:
        self._call(
            f"uploading {path} to {url}",
            lambda: self.client.fput_object(url.bucket, url.key, str(path), content_type=content_type),
        )

    def size(self, url: S3Url) -> int | None:
        """The object's size, or None where there is no such object."""

        from minio.error import S3Error

        def stat() -> int | None:
            try:
                return self.client.stat_object(url.bucket, url.key).size
            except S3Error as err:
                if err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return None
                raise

        return self._call(f"looking up {url}", stat)

    def exists(self, url: S3Url) -> bool:
        return self.size(url) is not None

    def list(self, prefix: S3Url) -> Iterator[S3Url]:
        """Every object under `prefix/`, recursively."""
        names = self._call(
            f"listing {prefix}",
            lambda: [
                o.object_name for o in self.client.list_objects(prefix.bucket, prefix=prefix.key + "/", recursive=True)
            ],
        )
        return (S3Url(prefix.bucket, name) for name in names)

    def delete(self, url: S3Url) -> None:
        self._call(f"deleting {url}", lambda: self.client.remove_object(url.bucket, url.key))
