"""Stage identity: the sha256 of canonical JSON.

Equal inputs give equal text (sorted keys, no spaces, floats by repr), so a stage key
names what determines a stage's output and nothing else. Keys refuse NaN and inf (a
stage's inputs must be finite); manifests may carry them (a diverged run's metrics), so
they ask for `allow_nan=True`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from lth_search.errors import StoreError

KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(value: Any, allow_nan: bool = False) -> str:
    """Canonical JSON: sorted keys, no spaces, floats by repr. Equal inputs give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=allow_nan)


def content_key(value: Any) -> str:
    """sha256 hex digest of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def check_key(key: object) -> str:
    """A stage key (64 lowercase hex chars), or StoreError: keys become path names, so this one
    check, beside the function that makes keys, is what keeps a key inside its root."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise StoreError(f"invalid stage key {key!r}: expected 64 lowercase hex characters (a sha256 digest)")
    return key
