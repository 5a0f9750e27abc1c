"""Names in a federation (federations, silo ids, admin names, run ids): one lower-case DNS label.

RFC 1123 labels are safe in a SPIFFE URI, a Kubernetes object name, a DNS name and a directory
name alike. The one pattern lives here, below every package that checks a name.
"""

from __future__ import annotations

import re
from typing import TypeGuard

LABEL_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
LABEL_RE = re.compile(LABEL_PATTERN)
LABEL_RULE = (
    "use 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit "
    "(a lower-case DNS label)"
)


def is_label(value: object) -> TypeGuard[str]:
    """True if `value` is a str that is one lower-case DNS label."""
    return isinstance(value, str) and LABEL_RE.fullmatch(value) is not None
