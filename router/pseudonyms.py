"""Keyed, stateless pseudonyms: new UIDs, patient pseudonyms and date offsets.

Everything is an HMAC-SHA256 of the original value under the site secret, so every node
and every run that shares the secret maps the same original to the same pseudonym with
no shared state, and nobody without the secret can reverse or even confirm a mapping.
Each kind of value has its own domain prefix so that, say, a UID and a patient ID that
happen to be equal do not get related pseudonyms.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from functools import lru_cache


class Pseudonymizer:
    def __init__(self, secret: bytes, prefix: str = "DEID-", shift_min_days: int = 365, shift_max_days: int = 3650):
        self._secret = secret
        self.prefix = prefix
        self.shift_min_days = shift_min_days
        self.shift_max_days = shift_max_days
        self.uid = lru_cache(maxsize=65536)(self._uid)

    def _mac(self, domain: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{domain}\0{value}".encode(), hashlib.sha256).digest()

    def _uid(self, original: str) -> str:
        """A UID under the 2.25 (UUID-derived integer) root; at most 44 characters."""
        return "2.25." + str(int.from_bytes(self._mac("uid", original)[:16], "big"))

    def code(self, domain: str, value: str, length: int = 12) -> str:
        """A short keyed code of letters and digits (base32: unambiguous upper case)."""
        return base64.b32encode(self._mac(domain, value)).decode()[:length]

    def patient(self, patient_key: str) -> str:
        """The pseudonym used for both PatientName and PatientID."""
        return self.prefix + self.code("patient", patient_key)

    def value(self, tag: int, value: str) -> str:
        """A pseudonym for any other value a site asks to pseudonymise (e.g. accession)."""
        return self.prefix + self.code(f"value:{tag:08X}", value, 10)

    def date_offset_days(self, patient_key: str) -> int:
        """Days to subtract from every date of this patient: one offset per patient."""
        span = self.shift_max_days - self.shift_min_days + 1
        return self.shift_min_days + int.from_bytes(self._mac("date-offset", patient_key)[:8], "big") % span

    def fingerprint(self, value: str) -> str:
        """A short keyed hash for logs, where even a pseudonym is more than needed."""
        return self.code("log", value, 10).lower()
