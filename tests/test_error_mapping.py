"""Domain errors -> HTTP: the library (src/parotid) raises domain errors only, the app maps them in one
place (apps/parotid/lib/errors.py). No server: the mapping itself and the layering are checked here; the
server tests (test_api_errors.py, test_pacs_server.py, test_registry_server.py) see the answers."""

from __future__ import annotations

import ast
import sys

import pytest

from conftest import APP, ROOT
from parotid.registry import RegistryError
from parotid.study import NotFoundError, StudyError


@pytest.fixture
def errors():
    sys.path.insert(0, str(APP))
    try:
        from lib import errors

        yield errors
    finally:
        sys.path.remove(str(APP))


def test_the_library_raises_no_http_exceptions():
    """src/parotid never builds a FastAPI/Starlette HTTPException: which status a domain error gets is the app's."""
    offenders = []
    for path in sorted((ROOT / "src" / "parotid").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id == "HTTPException":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "HTTPException":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_domain_errors_map_to_their_status(errors):
    from fastapi import HTTPException

    cases = [(NotFoundError("study 'x' has no label with tag 'final'"), 404), (StudyError("roi outside the study"), 422),
             (RegistryError(409, "read-only model dir"), 409), (RegistryError(404, "no version 7"), 404)]
    for exc, status in cases:
        with pytest.raises(HTTPException) as e, errors.http_errors():
            raise exc
        assert (e.value.status_code, e.value.detail) == (status, str(exc))
        assert errors.http_error(exc).status_code == status
    with pytest.raises(HTTPException) as e, errors.http_errors():
        int("x")
    assert e.value.status_code == 422 and e.value.detail.startswith("invalid request: ")
    assert errors.http_error(RuntimeError("server fault")) is None  # stays a 500
    with pytest.raises(RuntimeError), errors.http_errors():
        raise RuntimeError("server fault")
