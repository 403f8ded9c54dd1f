"""API keys: read from a file, kept only as sha256 digests, compared in constant time. A key
itself is never logged or stored.

One key per line; a word starting with `#` starts a comment:

    sk-plain-key                    # the key itself
    sha256:<64 hex digits> alice    # only its digest (printf %s KEY | sha256sum), named

The optional second field names the client in metrics (`client` label) and in the per-key
concurrency limit; keys with one name share it, so a rotated key and its successor are one
client. Unnamed keys are known by the first 16 hex digits of their digest."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from pathlib import Path

from reconciler.gateway.asgi import Scope

log = logging.getLogger(__name__)
_DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ApiKeyError(Exception):
    pass


class ApiKeys:
    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self._digests: list[tuple[bytes, str]] = []  # (sha256 digest, client name)
        self._stamp: tuple[int, int] | None = None
        self.generation = 0  # counts loads: who checked a key once knows when to look again
        if self.path is not None:
            self.load()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self) -> None:
        assert self.path is not None
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8-sig")  # -sig: a BOM is not part of a key
        except OSError as exc:
            raise ApiKeyError(
                f"gateway.api_keys_file: cannot read {self.path}: {exc.strerror}; "
                "create it with one key per line or remove the setting"
            ) from exc
        except UnicodeDecodeError as exc:
            line = self.path.read_bytes()[: exc.start].count(b"\n") + 1
            raise ApiKeyError(
                f"gateway.api_keys_file: {self.path} line {line}: not UTF-8 text; save it as UTF-8"
            ) from None
        digests = []
        for number, text_line in enumerate(text.splitlines(), 1):
            fields = text_line.split()
            comment = next((i for i, f in enumerate(fields) if f.startswith("#")), len(fields))
            fields = fields[:comment]  # a '#' inside a key is part of the key
            if not fields:
                continue
            digests.append(self._parse(fields, number))
        self._digests = digests
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        self.generation += 1
        log.info("loaded %d API key(s) from %s", len(digests), self.path)

    def _parse(self, fields: list[str], number: int) -> tuple[bytes, str]:
        # Never quote the line in an error: it may hold a key.
        where = f"gateway.api_keys_file: {self.path} line {number}"
        if len(fields) > 2:
            raise ApiKeyError(
                f"{where}: more than 'KEY [NAME]'; a key has no spaces, a name is one word"
            )
        secret = fields[0]
        if secret.lower().startswith("sha256:"):
            found = _DIGEST.fullmatch(secret)
            if found is None:
                raise ApiKeyError(
                    f"{where}: 'sha256:' must be followed by 64 hex digits (printf %s KEY | sha256sum)"
                )
            digest = bytes.fromhex(found.group(1))
        else:
            digest = hashlib.sha256(secret.encode()).digest()
        if len(fields) == 1:
            return digest, digest.hex()[:16]
        if _NAME.fullmatch(fields[1]) is None:
            raise ApiKeyError(
                f"{where}: a client name is 1-64 letters, digits, '.', '_' or '-', starting with "
                "a letter or digit"
            )
        return digest, fields[1]

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
        """The client a valid `Bearer` header names (the key's name, or a digest prefix),
        else None."""
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode()).digest()
        match = None
        for digest, client in self._digests:  # look at every key: timing says nothing about which
            if hmac.compare_digest(digest, presented):
                match = client
        return match


def with_api_key_header(scope: Scope) -> Scope:
    """`scope` with `X-API-Key: K` presented as `Authorization: Bearer K` (the earlier ML
    Offload API's clients send it): same checks, same per-key limits, one code path. It wins
    over an Authorization header: SDKs send a placeholder bearer when given a custom header."""
    headers = scope["headers"]
    key = next((value for name, value in headers if name == b"x-api-key"), None)
    if key is None:
        return scope
    kept = [(n, v) for n, v in headers if n != b"authorization"]
    return {**scope, "headers": [*kept, (b"authorization", b"Bearer " + key)]}
