"""Identifiers that travel through the cluster (request, job and transfer ids) and the keys and paths built
from them.

A client-chosen id is checked at the edge against ``ID_CHARS`` (letters, digits, ``_``, ``-`` and ``.``,
not starting with ``.``, at most ``MAX_ID`` characters; job ids without ``.``) and refused with
INVALID_ARGUMENT naming the field otherwise. Whatever reaches a Redis key or a file path goes through
``safe_key`` as well, so an id that got past an edge (an old client, a direct internal call) still cannot
escape a directory or alias another key: an unsafe id is replaced by a digest of itself.
"""

from __future__ import annotations

import hashlib
import re

MAX_ID = 128
MAX_CUSTOM_ID = 512
ID_CHARS = "letters, digits, '_', '-' and '.' (not first)"
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_JOB_ID = re.compile(r"[A-Za-z0-9_-]+")


def check_id(field: str, value: str, job: bool = False) -> str | None:
    """``"field: problem"`` if ``value`` is not a valid id (empty is allowed: the service picks one)."""
    if not value:
        return None
    if len(value) > MAX_ID:
        return f"{field}: at most {MAX_ID} characters"
    if not (_JOB_ID if job else _ID).fullmatch(value):
        chars = "letters, digits, '_' and '-'" if job else ID_CHARS
        return f"{field}: only {chars}"
    return None


def safe_key(value: str) -> str:
    """``value`` itself when it is a valid id, else ``h`` + a digest of it (stable, collision-resistant)."""
    if value and len(value) <= MAX_ID and _ID.fullmatch(value):
        return value
    return "h" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:40]
