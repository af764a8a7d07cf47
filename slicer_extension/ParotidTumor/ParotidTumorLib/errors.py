"""Turning failures of server calls into messages a radiologist can act on."""

from __future__ import annotations

import json


class ServerError(Exception):
    """A failed server call. ``str(err)`` is the user message; `status` is the HTTP code (None when
    the server could not be reached) and `detail` the server's own message."""

    def __init__(self, message: str, status: int | None = None, detail: str | None = None, url: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.url = url


def detail_from_body(body, content_type: str | None = "application/json") -> str:
    """The server's error message: FastAPI's ``{"detail": msg}`` (or its list of validation errors)."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    text = (body or "").strip()
    try:
        obj = json.loads(text)
    except (ValueError, TypeError):
        return text[:300]
    if isinstance(obj, dict) and "detail" in obj:
        d = obj["detail"]
        if isinstance(d, list):  # FastAPI request-validation errors
            msgs = []
            for e in d:
                if isinstance(e, dict):
                    loc = ".".join(str(x) for x in e.get("loc", []) if x not in ("body", "query"))
                    msgs.append(f"{loc}: {e.get('msg', '')}" if loc else str(e.get("msg", "")))
                else:
                    msgs.append(str(e))
            return "; ".join(msgs)
        return str(d)
    if isinstance(obj, dict) and "error" in obj:
        return str(obj["error"])
    return text[:300]


def user_message(status: int, detail: str, what: str = "", url: str = "") -> str:
    """Message for an HTTP error `status` with server `detail`; `what` names the action
    (e.g. "Classify tumour"), used as a prefix."""
    d = (detail or "").strip()
    prefix = f"{what}: " if what else ""
    if status == 401:
        msg = "the server requires you to log in (or your login expired). Enter user name and password and Connect again."
    elif status == 403:
        msg = "your account is not allowed to do this (annotator or admin role needed). Ask the server administrator."
    elif status == 404:
        low = d.lower()
        if "model" in low or "task" in low or "strategy" in low:
            msg = f"the server does not offer this model ({d}). Connect again to refresh the model list; the server may have been started without it."
        elif "image" in low or "study" in low or "label" in low:
            msg = f"not found on the server ({d}). Upload the study again (Segment/Classify uploads it) or pick another one."
        else:
            msg = f"not found on the server ({d or 'HTTP 404'})."
    elif status == 429:
        msg = f"the server is busy: a training run is already in progress ({d}). Wait for it to finish or stop it first."
    elif status == 409:
        msg = f"the server cannot do this right now: {d or 'conflict'}. If a training run is in progress, wait for it or stop it."
    elif status == 422:
        msg = f"the server rejected the input: {d or 'invalid request'}. Check the tumour box and the sequence volumes."
    elif status == 400:
        msg = f"bad request: {d or 'HTTP 400'}."
    elif status == 413:
        msg = "the study is too large for the server's upload limit."
    elif 500 <= status < 600:
        msg = f"the server failed (HTTP {status}): {d or 'internal error'}. See the server log; report it if it persists."
    else:
        msg = f"HTTP {status}: {d}"
    return prefix + msg if prefix else msg[:1].upper() + msg[1:]


def connection_message(url: str, reason: str = "", timeout: float | None = None) -> str:
    if timeout is not None:
        return f"Server at {url} did not answer within {timeout:g} s. It may be busy (training) or down."
    r = f" ({reason})" if reason else ""
    return f"Cannot reach server at {url}{r}. Check the address and that the MONAI Label server is running."
