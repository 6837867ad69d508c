"""The NoPorts signed envelope (spec noports-protocol.md §4).

Owns the byte-exact JSON that NoPorts signs: ``{"payload": {...}, "signature": ..., "hashingAlgo":
"sha256", "signingAlgo": "rsa2048"}``, the signature being RSA PKCS#1 v1.5 over the compact JSON of
the payload.  Dart's ``jsonEncode`` keeps insertion order, adds no whitespace and escapes only
``"``, ``\\`` and control characters (lower-case ``\\u00xx``) -- exactly Python's ``json.dumps``
with ``separators=(",", ":")`` and ``ensure_ascii=False``.  Sans-IO.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from noports.at.crypto import sign, verify
from noports.errors import SignatureError

__all__ = ["compact_json", "encode_envelope", "sign_envelope", "verify_envelope"]

HASHING_ALGO = "sha256"
SIGNING_ALGO = "rsa2048"
_ACCEPTED_HASHING = ("sha256", "sha512")


def compact_json(obj: Any) -> str:
    """JSON as Dart/cJSON write it: insertion order, no spaces, non-ASCII kept as is.

    NaN/Infinity are refused: Dart's encoder throws on them, so they can never be signed there.
    """
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sign_envelope(payload: dict, priv: RSAPrivateKey) -> dict:
    """Wrap ``payload`` with a signature by the sender's *encryption* private key."""
    data = compact_json(payload).encode("utf-8")
    return {
        "payload": payload,
        "signature": sign(priv, data, HASHING_ALGO),
        "hashingAlgo": HASHING_ALGO,
        "signingAlgo": SIGNING_ALGO,
    }


def encode_envelope(payload: dict, priv: RSAPrivateKey) -> str:
    return compact_json(sign_envelope(payload, priv))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def _parse(envelope: str | bytes | bytearray | memoryview) -> Any:
    if isinstance(envelope, (bytes, bytearray, memoryview)):
        envelope = bytes(envelope).decode("utf-8")
    # Python dicts keep the received key order, which is what must be re-serialised.
    return json.loads(envelope, parse_constant=_refuse_constant)


def verify_envelope(envelope: str | bytes | dict, pub: RSAPublicKey) -> dict:
    """Check an envelope and return its payload; SignatureError for *any* problem.

    The payload is re-serialised compactly in the order it was received and the signature is
    checked over those bytes, as the Dart and C daemons do.
    """
    try:
        env = envelope if isinstance(envelope, dict) else _parse(envelope)
        if not isinstance(env, dict):
            raise SignatureError("envelope is not a JSON object")
        payload = env.get("payload")
        signature = env.get("signature")
        hashing = env.get("hashingAlgo")
        signing = env.get("signingAlgo")
        if not isinstance(payload, dict):
            raise SignatureError("envelope payload is missing or not a JSON object")
        for name, value in (("signature", signature), ("hashingAlgo", hashing),
                            ("signingAlgo", signing)):
            if not isinstance(value, str):
                raise SignatureError(f"envelope {name} is missing or not a string")
        if signing != SIGNING_ALGO:
            raise SignatureError(f"unsupported signingAlgo {signing[:40]!r} (only rsa2048)")
        if hashing not in _ACCEPTED_HASHING:
            raise SignatureError(f"unsupported hashingAlgo {hashing[:40]!r}")
        data = compact_json(payload).encode("utf-8")
        if not verify(pub, data, signature, hashing):
            raise SignatureError("envelope signature did not verify")
        return payload
    except SignatureError:
        raise
    # Garbage of any shape (bad UTF-8, bad JSON, absurd nesting -> RecursionError, lone
    # surrogates, values json cannot encode) is "not a valid envelope", never a crash.
    except Exception as exc:
        raise SignatureError(f"malformed envelope: {type(exc).__name__}: {exc}"[:300]) from None
