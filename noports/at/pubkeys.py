"""Other atSigns' encryption public keys (``public:publickey@x``) as npd and srvd check them.

Owns :class:`PublicKeys`: the key's text is looked up on every use (Atsign's SDKs dropped their
cache of these because a stale key after a rotation broke sessions), but the parsed RSA key is
kept by its text, in a bounded table (oldest out first), because parsing the DER again for every
request would be waste.  srvd's workers are handed the text and use only :meth:`PublicKeys.parse`.

Not here: the keys a client encrypts to (``sharedkeys.py`` caches those, text and all).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from noports.at.crypto import public_key_from_b64
from noports.errors import AtServerError

if TYPE_CHECKING:
    from noports.at.client import AtClient

__all__ = ["PublicKeys"]


class PublicKeys:
    """Parsed public keys by their base64 text, at most ``size`` of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._parsed: OrderedDict[str, RSAPublicKey] = OrderedDict()

    def __len__(self) -> int:
        return len(self._parsed)

    def parse(self, text: str) -> RSAPublicKey:
        """The key ``text`` encodes; ValueError if it is no RSA public key."""
        key = self._parsed.get(text)
        if key is None:
            key = public_key_from_b64(text)
            self._parsed[text] = key
            if len(self._parsed) > self.size:
                self._parsed.popitem(last=False)
        return key

    async def lookup(self, client: AtClient, atsign: str, timeout: float) -> RSAPublicKey:
        """``plookup:publickey@<atsign>`` now (asyncio.TimeoutError after ``timeout`` s);
        AtServerError AT0015 if the atSign has none, ValueError if it is not a key."""
        text = await asyncio.wait_for(client.plookup(f"publickey{atsign}"), timeout)
        if not text:
            raise AtServerError("AT0015", f"{atsign} has no public encryption key")
        return self.parse(text)
