"""MONAI Label 0.8.5 token validation fix (role-based access with Keycloak or any OIDC realm).

MONAI Label 0.8.5 verifies bearer tokens with ``jwt.decode(token, key, options=...)`` and no
``algorithms`` argument; PyJWT >= 2 (2.15 here) refuses that with ``DecodeError: It is required that you
pass in a value for the "algorithms" argument``, so with ``MONAI_LABEL_AUTH_ENABLE=true`` *every* token,
valid or not, is answered 401. ``fix_monailabel_jwt()`` makes the check pass the realm's signing
algorithm(s) (``PAROTID_AUTH_ALGORITHMS``, default ``RS256`` = Keycloak's default); signature, expiry and
roles are verified exactly as before. Call it once at app import (``apps/parotid/main.py``).
"""

from __future__ import annotations

import os


def fix_monailabel_jwt(algorithms: tuple[str, ...] | None = None) -> bool:
    """Patch ``monailabel.endpoints.user.auth`` so ``jwt.decode`` gets ``algorithms``. Idempotent;
    returns True when the patch is (now) installed."""
    import monailabel.endpoints.user.auth as auth

    if getattr(auth, "_parotid_jwt_fixed", False):
        return True
    algs = list(algorithms or [a.strip() for a in os.environ.get("PAROTID_AUTH_ALGORITHMS", "RS256").split(",") if a.strip()])
    real = auth.jwt

    class _JWT:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def decode(token, key=None, *args, **kwargs):
            kwargs.setdefault("algorithms", algs)
            return real.decode(token, key, *args, **kwargs)

    auth.jwt = _JWT()
    auth._parotid_jwt_fixed = True
    return True
