"""Shamir t-of-n secret sharing over the Mersenne prime 2^521 - 1, for secrets of up to 64 bytes.

Shares are points (x, f(x)) of a random polynomial f of degree t-1 with f(0) = secret; the
x-coordinates are the holders' 1-based indices in the round's roster. Any t shares reconstruct by
Lagrange interpolation at 0; t-1 shares are consistent with every possible secret (information-
theoretically hiding). When more than t shares are given, all of them must lie on one polynomial
of degree t-1, otherwise reconstruction refuses ("inconsistent shares").
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence

from pf2lora.common.errors import InvalidArgument

logger = logging.getLogger(__name__)

PRIME = (1 << 521) - 1
"""The field: the Mersenne prime 2^521 - 1 (a 64-byte secret is < 2^512 < PRIME)."""

SHARE_BYTES = 66
"""Big-endian length of one share value (521 bits -> 66 bytes)."""

MAX_SECRET_BYTES = 64


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise InvalidArgument(f"duplicate share x-coordinates in {sorted(xs)}")
    for x in xs:
        if not isinstance(x, int) or not 0 < x < PRIME:
            raise InvalidArgument(f"share x-coordinates must be integers in [1, p), got {x!r}")


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares of ``secret`` for the holders at ``xs``: any ``threshold`` of them reconstruct."""
    if not isinstance(secret, bytes | bytearray) or not 0 < len(secret) <= MAX_SECRET_BYTES:
        raise InvalidArgument(f"a secret must be 1..{MAX_SECRET_BYTES} bytes")
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise InvalidArgument(
            f"threshold must be in [1, number of holders = {len(xs)}], got {threshold}"
        )
    # f(x) = secret + a_1 x + ... + a_{t-1} x^{t-1}, coefficients uniform in the field.
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, int] = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def _barycentric_weights(xs: Sequence[int]) -> list[int]:
    """w_i = 1 / prod_{j != i} (x_i - x_j) mod p: independent of the evaluation point."""
    weights = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                den = den * (xi - xj) % PRIME
        weights.append(pow(den, -1, PRIME))
    return weights


def _evaluate(points: Sequence[tuple[int, int]], weights: Sequence[int], at: int) -> int:
    """f(at) for the polynomial of degree len(points)-1 through ``points`` (Lagrange form).

    f(at) = sum_i y_i w_i prod_{j != i} (at - x_j), the products from prefix and suffix
    products so one evaluation costs O(t) multiplications and no inversion.
    """
    diffs = [(at - x) % PRIME for x, _ in points]
    prefix = [1] * (len(diffs) + 1)
    for i, d in enumerate(diffs):
        prefix[i + 1] = prefix[i] * d % PRIME
    total, suffix = 0, 1
    for i in range(len(points) - 1, -1, -1):
        total = (total + points[i][1] * weights[i] % PRIME * prefix[i] % PRIME * suffix) % PRIME
        suffix = suffix * diffs[i] % PRIME
    return total


def reconstruct(shares: Mapping[int, int], threshold: int, secret_len: int) -> bytes:
    """The secret of ``secret_len`` bytes from at least ``threshold`` shares {x: f(x)}.

    Raises InvalidArgument for too few shares, out-of-range values, or shares that do not lie on
    one polynomial of degree threshold-1 (checked whenever more than ``threshold`` are given).
    """
    if not 0 < secret_len <= MAX_SECRET_BYTES:
        raise InvalidArgument(f"secret_len must be 1..{MAX_SECRET_BYTES}, got {secret_len}")
    if threshold < 1:
        raise InvalidArgument(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise InvalidArgument(
            f"too few shares to reconstruct: {len(shares)} given, threshold is {threshold}"
        )
    xs = list(shares)
    _check_xs(xs)
    for x, y in shares.items():
        if not isinstance(y, int) or not 0 <= y < PRIME:
            raise InvalidArgument(f"share at x={x} is not a field element")
    points = sorted(shares.items())
    basis, extra = points[:threshold], points[threshold:]
    weights = _barycentric_weights([x for x, _ in basis])
    secret = _evaluate(basis, weights, 0)
    for x, y in extra:
        if _evaluate(basis, weights, x) != y:
            raise InvalidArgument(
                f"inconsistent shares: the share at x={x} is not on the polynomial through "
                f"the first {threshold} shares"
            )
    if secret >> (8 * secret_len):
        raise InvalidArgument(
            f"inconsistent shares: the reconstructed value does not fit in {secret_len} bytes"
        )
    return secret.to_bytes(secret_len, "big")


def share_to_bytes(y: int) -> bytes:
    """Fixed-length big-endian encoding of a share value."""
    if not 0 <= y < PRIME:
        raise InvalidArgument("a share value must be a field element")
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Inverse of share_to_bytes; refuses wrong lengths and values outside the field."""
    if len(data) != SHARE_BYTES:
        raise InvalidArgument(f"a share must be {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise InvalidArgument("a share value must be a field element")
    return y
