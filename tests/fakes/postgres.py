"""A throwaway PostgreSQL cluster for the registry's tests: the real server from Debian's
`postgresql` package, on a unix socket in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class PostgresCluster:
    """A private cluster on a unix socket in a temporary directory (as the `postgres` user when
    running as root, since initdb refuses root). `url` is a libpq URL for database `tf`."""

    def __init__(self) -> None:
        self.bin = next((d for d in PG_BIN_DIRS if (d / "initdb").exists()), None)
        self.root: Path | None = None
        self.url = ""
        self.failure: str | None = None

    @property
    def unavailable(self) -> str | None:
        if self.failure:
            return self.failure
        if self.bin is None:
            return "PostgreSQL is not installed (apt-get install postgresql)"
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            return "running as root without runuser: cannot start PostgreSQL as another user"
        return None

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        assert self.bin is not None
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    def start(self) -> str:
        if reason := self.unavailable:
            raise RuntimeError(reason)
        self.root = Path(tempfile.mkdtemp(prefix="tf-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        data, sock = self.root / "data", self.root
        steps = [
            ("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"),
            (
                "pg_ctl", "-D", str(data), "-l", str(self.root / "log"), "-w", "-t", "30",
                "-o", f"-k {sock} -c listen_addresses='' -c fsync=off", "start",
            ),
            ("createdb", "-h", str(sock), "-U", "postgres", "tf"),
        ]  # fmt: skip
        for step in steps:
            result = self._run(*step)
            if result.returncode != 0:
                self.stop()
                raise RuntimeError(f"{step[0]} failed: {result.stderr.strip()[-400:]}")
        self.url = f"postgresql://postgres@/tf?host={sock}"
        return self.url

    def stop(self) -> None:
        if self.root is None:
            return
        if (self.root / "data" / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def reset(self) -> None:
        """An empty database: drop every table the registry created."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")


_shared: PostgresCluster | None = None


def shared_postgres() -> PostgresCluster:
    """One cluster per test process, started on first use and stopped at exit."""
    global _shared
    if _shared is None:
        import atexit

        cluster = PostgresCluster()
        if cluster.unavailable is None:
            try:
                cluster.start()
                atexit.register(cluster.stop)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                cluster.failure = f"PostgreSQL did not start: {exc}"
        _shared = cluster
    return _shared
