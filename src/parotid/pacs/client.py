"""DICOMweb client construction (credentials from the environment, never from code)."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterator

import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass

logger = logging.getLogger(__name__)

# Environment variables holding PACS credentials, first found wins. MONAI Label's own names come first
# so that one deployment config serves both the stock and the parotid datastore.
USER_ENV = ("MONAI_LABEL_DATASTORE_USERNAME", "MONAI_LABEL_DICOMWEB_USERNAME", "PAROTID_DICOMWEB_USERNAME")
PASSWORD_ENV = ("MONAI_LABEL_DATASTORE_PASSWORD", "MONAI_LABEL_DICOMWEB_PASSWORD", "PAROTID_DICOMWEB_PASSWORD")


def _first_env(names) -> str:
    for n in names:
        v = os.environ.get(n, "")
        if v:
            return v
    return ""


def phi_safe_id(uid: str) -> str:
    """A short, stable, non-reversible id for logs (UIDs are not PHI, but this keeps logs short)."""
    return hashlib.sha1(uid.encode()).hexdigest()[:10]


class DICOMwebClientX(DICOMwebClient):
    """Tolerates servers that answer WADO-RS with a single-part content type (as MONAI Label's does)."""

    def _decode_multipart_message(self, response: requests.Response, stream: bool) -> Iterator[bytes]:
        content_type = response.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type != "multipart/related":
            response.headers["content-type"] = "multipart/related"
        return super()._decode_multipart_message(response, stream)  # type: ignore[misc]


def make_client(url: str, username: str | None = None, password: str | None = None, timeout: float = 60.0) -> DICOMwebClient:
    """DICOMweb client for `url`; basic-auth credentials from arguments or the environment."""
    username = username if username is not None else _first_env(USER_ENV)
    password = password if password is not None else _first_env(PASSWORD_ENV)
    session = create_session_from_user_pass(username, password) if username else requests.Session()
    # dicomweb_client has no global timeout: wrap the session's request.
    orig = session.request

    def request(method, url, **kw):
        kw.setdefault("timeout", timeout)
        return orig(method, url, **kw)

    session.request = request  # type: ignore[method-assign]
    client = DICOMwebClientX(url=url.rstrip("/"), session=session)
    # dicomweb_client retries every failed request (connection errors included) 5 times with 2, 4, 8, 16 s
    # back-off: 30 s per call on a PACS that is down. Keep it short; the datastore falls back to its cache.
    client.set_http_retry_params(max_attempts=max(1, int(os.environ.get("PAROTID_DICOMWEB_ATTEMPTS", "2"))),
                                 wait_exponential_multiplier=250)
    return client
