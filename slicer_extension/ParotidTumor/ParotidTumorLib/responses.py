"""Parsing MONAI Label /infer responses: JSON-only, multipart/form-data, or a bare image.

MONAI Label 0.8.5 answers ``POST /infer/<model>`` with

* ``multipart/form-data`` (encoded server-side by ``requests_toolbelt.MultipartEncoder``): a ``params``
  part (JSON) and an ``image`` part (the result NIfTI) -- segmentation, box contour, and
  classification with a heatmap (Grad-CAM x RoI-Align read-out weight, or plain Grad-CAM);
* ``application/json`` when there is no result image (e.g. a classification model without heatmap) --
  the case that crashes the stock Slicer plugin, which always expects a multipart body;
* the image alone for ``?output=image``.

Multipart parser choice: a small stdlib-only splitter on the RFC 2046 delimiter (``CRLF--boundary``),
with headers parsed by ``email.parser.BytesHeaderParser``. Not ``requests_toolbelt.MultipartDecoder``:
it is not bundled with 3D Slicer (would need a pip install at first use). Not ``cgi.FieldStorage``
(what the stock plugin uses): ``cgi`` is removed in Python 3.13. Not ``email``'s full MIME parser:
it splits on universal newlines and round-trips bodies through str, which we would have to trust to be
byte-exact for gzip payloads; slicing the bytes is exact by construction. The tests check it against
the server's own encoder (``MultipartEncoder``) with adversarial binary payloads and cross-check with
``MultipartDecoder``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser


class ResponseFormatError(ValueError):
    pass


@dataclass
class Part:
    name: str | None
    filename: str | None
    content_type: str | None
    content: bytes


def _content_type_params(content_type: str):
    msg = Message()
    msg["content-type"] = content_type or ""
    return msg.get_content_type(), dict((k.lower(), v) for k, v in msg.get_params([])[1:])


def parse_multipart(body: bytes, content_type: str) -> list:
    """Split a multipart body into :class:`Part` objects (bodies are exact byte slices)."""
    ctype, params = _content_type_params(content_type)
    if not ctype.startswith("multipart/"):
        raise ResponseFormatError(f"not a multipart response: {content_type!r}")
    boundary = params.get("boundary")
    if not boundary:
        raise ResponseFormatError("multipart response without boundary")
    delim = b"--" + boundary.encode("latin-1")
    # The body starts with "--boundary" (no preceding CRLF); every later delimiter is CRLF--boundary.
    data = b"\r\n" + body
    chunks = data.split(b"\r\n" + delim)
    if len(chunks) < 2:
        raise ResponseFormatError("multipart boundary not found in response body")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # close delimiter; the rest is the epilogue
            break
        # after the delimiter: optional transport padding (spaces/tabs), then CRLF
        eol = chunk.find(b"\r\n")
        if eol < 0 or chunk[:eol].strip(b" \t"):
            raise ResponseFormatError("malformed multipart delimiter line")
        chunk = chunk[eol + 2:]
        sep = chunk.find(b"\r\n\r\n")
        if chunk.startswith(b"\r\n"):
            head, content = b"", chunk[2:]
        elif sep < 0:
            raise ResponseFormatError("multipart part without header terminator")
        else:
            head, content = chunk[:sep], chunk[sep + 4:]
        hdr = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        disp = Message()
        disp["content-disposition"] = hdr.get("content-disposition", "")
        name = disp.get_param("name", header="content-disposition")
        filename = disp.get_filename()
        parts.append(Part(name=name, filename=filename, content_type=hdr.get("content-type"), content=content))
    else:
        raise ResponseFormatError("multipart body is truncated (no closing boundary)")
    return parts


@dataclass
class InferResponse:
    """Result of one /infer call: JSON ``params`` (may be empty) and, if any, the result image bytes."""

    params: dict = field(default_factory=dict)
    image: bytes | None = None
    image_name: str | None = None

    @property
    def has_image(self) -> bool:
        return bool(self.image)


def _json(raw: bytes, what: str):
    try:
        return json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResponseFormatError(f"{what} is not valid JSON ({e})") from None


def parse_infer_response(body: bytes, content_type: str) -> InferResponse:
    """Turn an /infer HTTP body into an :class:`InferResponse`, whatever form the server chose."""
    ctype, _ = _content_type_params(content_type)
    if ctype == "application/json" or ctype.endswith("+json"):
        params = _json(body, "server response")
        if not isinstance(params, dict):  # e.g. a JSON string "{}" from output=json of some apps
            params = _json(params.encode(), "server response") if isinstance(params, str) else {"result": params}
        return InferResponse(params=params or {})
    if ctype.startswith("multipart/"):
        out = InferResponse()
        for part in parse_multipart(body, content_type):
            if part.name == "params":
                p = _json(part.content, "params part")
                out.params = p if isinstance(p, dict) else {"result": p}
            elif part.filename or part.name in ("image", "file", "label"):
                out.image, out.image_name = part.content, part.filename or f"{part.name}.nii.gz"
        return out
    # a bare image (?output=image)
    return InferResponse(params={}, image=body, image_name="result.nii.gz")
