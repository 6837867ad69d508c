"""Exceptions that noports raises on purpose.

Every parser and protocol component raises one of these (never a bare ValueError/KeyError from
deep inside), so callers and fuzzers can tell "bad input" apart from "bug".
"""

from __future__ import annotations


class NoPortsError(Exception):
    """Root of every exception noports raises on purpose."""


class AtProtocolError(NoPortsError, ValueError):
    """Malformed bytes or lines on an atProtocol connection."""

    def __init__(self, message: str, code: str = "AT0003") -> None:
        super().__init__(message)
        self.code = code


class UnsupportedVerbError(AtProtocolError):
    """A real atProtocol verb that this implementation does not serve."""


class LineTooLongError(AtProtocolError):
    """A command or response line exceeded the configured cap."""

    def __init__(self, message: str = "Buffer limit exceeded") -> None:
        super().__init__(message, code="AT0005")


class AtServerError(NoPortsError):
    """An ``error:`` reply from an atServer."""

    def __init__(self, code: str, message: str, raw: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.raw = raw


class InvalidAtSignError(NoPortsError, ValueError):
    """Text that is not a valid atSign."""


class InvalidKeyError(NoPortsError, ValueError):
    """Text that is not a valid atKey."""


class InvalidDeviceNameError(NoPortsError, ValueError):
    """A NoPorts device name that fails the official rules."""


class AtKeysError(NoPortsError):
    """An .atKeys file that cannot be read or is malformed."""


class SignatureError(NoPortsError):
    """A signature (envelope, PKAM, relay auth) that did not verify."""
