"""Where storage credentials come from when none are given: the AWS tools' order, with the platform's
own identity (IRSA, EKS Pod Identity, ECS, EC2 instance profiles) last. See training/storage.py."""

from __future__ import annotations

import os
import re

import urllib3
from minio.credentials import AWSConfigProvider, ChainedProvider, Credentials, EnvAWSProvider, IamAwsProvider, Provider

from training.storage import IdentityUnavailable, StorageError, describe_error, is_transient


class PlatformIdentity(Provider):
    """The platform's identity: web identity (IRSA: AWS_WEB_IDENTITY_TOKEN_FILE), the container endpoint
    (EKS Pod Identity, ECS: AWS_CONTAINER_CREDENTIALS_FULL_URI / _RELATIVE_URI), else the instance
    profile (EC2 metadata). Where none is configured and no metadata service answers at all (asked
    with short timeouts, so a laptop finds out in seconds), it is "not here" for the chain. An
    identity that is configured, or that answered once in this process, and then fails — at start-up
    or at an hourly refresh — raises IdentityUnavailable instead: an outage, not a missing credential."""

    CONFIGURED_BY = ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                     "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_EC2_METADATA_SERVICE_ENDPOINT")  # fmt: skip

    def __init__(self):
        env = os.environ
        self.configured = next((name for name in self.CONFIGURED_BY if env.get(name)), None)
        self.answered = False
        # The AWS SDKs' endpoint settings: STS for web identity, else the metadata service's address.
        if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            endpoint = env.get("AWS_ENDPOINT_URL_STS")
        elif env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
            endpoint = None
        else:
            endpoint = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        # A 5xx comes back as urllib3's MaxRetryError (transient), not as minio's ValueError (final).
        retries = urllib3.Retry(total=0, connect=0, read=0, status_forcelist=[500, 502, 503, 504],
                                allowed_methods=None)  # STS is asked with a POST  # fmt: skip
        timeout = urllib3.Timeout(connect=5, read=30) if self.configured else urllib3.Timeout(connect=1, read=5)
        http = urllib3.PoolManager(timeout=timeout, retries=retries)
        self._provider = IamAwsProvider(custom_endpoint=endpoint or None, http_client=http)

    def retrieve(self) -> Credentials:
        try:
            credentials = self._provider.retrieve()
        except Exception as err:  # urllib3, JSON and STS errors alike
            if not (self.configured or self.answered):
                raise ValueError(f"no platform identity ({type(err).__name__})") from None  # the chain's "next"
            source = f"the platform identity ({self.configured or 'the instance metadata service'})"
            # A URL's query can hold the web identity token itself: never in a message.
            said = re.sub(r"\?\S*", "?…", describe_error(err))
            raise IdentityUnavailable(f"{source} gave no credentials: {said}", is_transient(err)) from None
        self.answered = True
        return credentials


class CredentialChain(ChainedProvider):
    """AWS's order: the environment (with AWS_SESSION_TOKEN), the shared credentials file, the platform.
    Finding none is a StorageError saying where credentials can come from."""

    def __init__(self):
        super().__init__([EnvAWSProvider(), AWSConfigProvider(), PlatformIdentity()])

    def retrieve(self) -> Credentials:
        try:
            return super().retrieve()
        except ValueError:
            raise StorageError(
                "no storage credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), "
                "AWS_PROFILE / ~/.aws/credentials, or run with an IAM role (IRSA, EKS Pod Identity, instance profile)"
            ) from None
