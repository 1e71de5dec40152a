"""SQLite's hot statements, run on the event loop's own thread when they cannot wait.

A hot statement (the stream lookup every request starts with, a read by
cursor, a group commit of a few events) is microseconds of SQLite's C code.
Handing it to a worker thread, as aiosqlite does, cost far more than the
statement: a queue, a wake-up of the thread, the GIL passing back and forth
while the event loop is busy, and a second wake-up to hand the result back.
Under 16 concurrent HTTP appends the main thread spent a quarter of its time
in the kernel passing the GIL, and a commit waited milliseconds for its turn.

So these statements run here, directly, on two connections of their own (a
reader and a writer), with busy_timeout 0: a statement that would have to wait
for a lock fails at once (SQLITE_BUSY) instead of blocking the event loop.
Then the caller runs it where waiting is harmless: a read on the aiosqlite
pool, a commit on a worker thread with the configured busy_timeout. Readers in
WAL mode never wait for writers, so in practice only a commit while another
connection writes (another process, or this process's SQLAlchemy connection
creating or deleting a stream) takes the slow way; and a commit of many
bytes, whose copying should not stall the loop.

Checkpoints copy the WAL into the database file and sync it: milliseconds of
I/O that must not stall the event loop. Automatic checkpoints are off on the
writer here; the writer runs a passive one on a worker thread, between two
commits, once the commits since the last one wrote about as many pages as
SQLite's own automatic checkpoint waits for.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger("streamkeep.sqlite")

T = TypeVar("T")

# SQLite's default for wal_autocheckpoint, in pages of its default size.
CHECKPOINT_PAGES = 1000
PAGE_BYTES = 4096
# Pages a commit writes besides its rows': the stream's row, the last leaf of
# the events table and of its index.
PAGES_PER_COMMIT = 3
# A commit of more row bytes than this runs on a worker thread: SQLite copies
# them with the GIL released, so the loop serves requests meanwhile, and the
# hand-off is a small part of such a commit.
INLINE_COMMIT_BYTES = 256 * 1024


def is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (with any extended code): a lock held elsewhere."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class InlineSqlite:
    """A reader and a writer connection used from the event loop's thread.

    `pragmas` are the engine's (journal mode, synchronous, foreign keys);
    `busy_timeout_ms` is how long a commit that found the file locked waits on
    its worker thread.
    """

    def __init__(self, path: str, pragmas: Sequence[str], busy_timeout_ms: int) -> None:
        self.path = path
        self._pragmas = list(pragmas)
        self._busy_timeout_ms = busy_timeout_ms
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        # A commit that had to wait runs on a worker thread with the writer
        # connection; nothing else uses the connection until it is back.
        self._lent: asyncio.Future[Any] | None = None
        self._pages_since_checkpoint = 0
        self._closed = False

    def _connect(self, *, writer: bool, timeout_ms: int = 0) -> sqlite3.Connection:
        # Autocommit (isolation_level None): a read runs in a snapshot of its own
        # and never leaves a transaction open, which would hold checkpoints back.
        # Not bound to this thread: the writer lends itself to a worker thread (a
        # commit that waits), never while in use here, and close runs on one.
        # On the loop, busy_timeout 0 from the start: not even the pragmas wait.
        db = sqlite3.connect(
            self.path, timeout=timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            for pragma in self._pragmas:
                db.execute(f"PRAGMA {pragma}")
            if writer:
                db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute("PRAGMA busy_timeout=0")
        except BaseException:
            db.close()
            raise
        return db

    def read(self, statement: str, params: Sequence[Any]) -> list[Any] | None:
        """The rows, or None when the file is locked and the read has to wait elsewhere."""
        if self._closed:
            raise sqlite3.ProgrammingError("the store is closed")
        try:
            if self._reader is None:
                self._reader = self._connect(writer=False)
            return self._reader.execute(statement, params).fetchall()
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                return None
            raise

    def data_version(self) -> int | None:
        """The writer connection's `PRAGMA data_version`: it changes with commits of
        every other connection, not with this process's appends (see SqlitePoller)."""
        if self._closed or (self._lent is not None and not self._lent.done()):
            return None
        try:
            if self._writer is None:
                self._writer = self._connect(writer=True)
            return int(self._writer.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                return None
            raise

    async def commit(self, transaction: Callable[[sqlite3.Connection], T], rows_bytes: int) -> T:
        """Run `transaction` (BEGIN IMMEDIATE ... COMMIT, rolled back on failure).

        Here when the write lock is free; on a worker thread that waits for
        it when it is held, or when the commit is large. `rows_bytes` is about
        the size of the rows it writes.
        """
        await self._writer_back()
        if self._closed:
            raise sqlite3.ProgrammingError("the store is closed")
        if rows_bytes > INLINE_COMMIT_BYTES:
            result = await self._commit_on_thread(transaction)
        else:
            try:
                if self._writer is None:
                    self._writer = self._connect(writer=True)
                result = transaction(self._writer)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                # Nothing was written: the transaction rolled back (or never began).
                result = await self._commit_on_thread(transaction)
        # Counted as half-filled pages: a row a little over half a page takes one
        # of its own, and overestimating only checkpoints a little early.
        self._pages_since_checkpoint += PAGES_PER_COMMIT + rows_bytes * 2 // PAGE_BYTES
        if self._pages_since_checkpoint >= CHECKPOINT_PAGES:
            self._pages_since_checkpoint = 0
            # On the writer, between two commits: a checkpoint run beside a
            # stream of commits never catches up with them, so the WAL could
            # never start over and grew without end. The next commit waits for
            # it, as it did for SQLite's automatic one; appends queue meanwhile.
            self._lend(_checkpoint).add_done_callback(_log_checkpoint_failure)
        return result

    async def _writer_back(self) -> None:
        if self._lent is not None and not self._lent.done():
            await asyncio.wait([self._lent])

    async def _commit_on_thread(self, transaction: Callable[[sqlite3.Connection], T]) -> T:
        timeout = self._busy_timeout_ms

        def waiting(db: sqlite3.Connection) -> T:
            db.execute(f"PRAGMA busy_timeout={timeout}")
            try:
                return transaction(db)
            finally:
                db.execute("PRAGMA busy_timeout=0")

        # Shielded: a cancelled committer must not take the connection back
        # while the thread still uses it; the next commit waits for it.
        return await asyncio.shield(self._lend(waiting))

    def _lend(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run `work` with the writer on a worker thread; nothing else uses it meanwhile."""

        def run() -> T:
            if self._writer is None:  # the file was locked even for connecting
                self._writer = self._connect(writer=True, timeout_ms=self._busy_timeout_ms)
            return work(self._writer)

        lent = asyncio.ensure_future(asyncio.to_thread(run))
        self._lent = lent
        lent.add_done_callback(self._returned)
        return lent

    def _returned(self, lent: asyncio.Future[Any]) -> None:
        if self._lent is lent:
            self._lent = None
        if not lent.cancelled():
            lent.exception()  # retrieved, also when a cancelled committer no longer waits

    async def close(self) -> None:
        self._closed = True
        await self._writer_back()
        connections = [c for c in (self._reader, self._writer) if c is not None]
        self._reader = self._writer = None
        # The last connection to the file to close checkpoints it: not on the loop.
        await asyncio.to_thread(_close_all, connections)


def _checkpoint(db: sqlite3.Connection) -> None:
    # PASSIVE: copies what no reader still needs, never waits for a lock.
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _log_checkpoint_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        # The next one catches up; the WAL grows a little meanwhile.
        log.warning("SQLite checkpoint failed: %s", done.exception())


def _close_all(connections: list[sqlite3.Connection]) -> None:
    for db in connections:
        db.close()
