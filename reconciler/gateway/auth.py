"""API keys: read from a file (one per line, `#` comments), kept only as sha256 digests,
compared in constant time. A key itself is never logged or stored."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class ApiKeyError(Exception):
    pass


class ApiKeys:
    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self._digests: list[bytes] = []
        self._stamp: tuple[int, int] | None = None
        if self.path is not None:
            self.load()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self) -> None:
        assert self.path is not None
        try:
            stat = self.path.stat()
            text = self.path.read_text()
        except OSError as exc:
            raise ApiKeyError(
                f"gateway.api_keys_file: cannot read {self.path}: {exc.strerror}; "
                "create it with one key per line or remove the setting"
            ) from exc
        digests = []
        for line in text.splitlines():
            key = line.strip()
            if key and not key.startswith("#"):
                digests.append(hashlib.sha256(key.encode()).digest())
        self._digests = digests
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        log.info("loaded %d API key(s) from %s", len(digests), self.path)

    def reload_if_changed(self) -> None:
        if self.path is None:
            return
        try:
            stat = os.stat(self.path)
        except OSError:
            return  # keep the keys we have rather than lock everyone out
        if (stat.st_mtime_ns, stat.st_size) != self._stamp:
            try:
                self.load()
            except ApiKeyError as exc:
                log.warning("%s", exc)

    def identify(self, authorization: str | None) -> str | None:
        """The key's identity (a digest prefix) for a valid `Bearer` header, else None."""
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode()).digest()
        match = None
        for digest in self._digests:  # look at every key: timing says nothing about which
            if hmac.compare_digest(digest, presented):
                match = digest
        return match.hex()[:16] if match is not None else None
