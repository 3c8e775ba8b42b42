"""Opening the catalog: engine, sessions and the schema-version check."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine, create_engine, event, inspect, make_url, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from handlens.core.errors import BusyError, CatalogVersionError, InputError
from handlens.data.catalog.schema import SCHEMA_VERSION, Base, SchemaVersion

#: How long a SQLite connection waits for another command's write transaction before giving up (the
#: sqlite3 module's own default, made explicit). Writers hold the lock for one short transaction (an
#: import commits every few hundred rows), so a wait this long means a command is stuck or holds the
#: catalog on purpose; the importer tries a batch a few times before it gives up.
DEFAULT_BUSY_TIMEOUT = 5.0


class CatalogBusyError(BusyError):
    """Another command holds the catalog's write lock for longer than the busy timeout (SQLite): retry later."""


def busy_error(exc: BaseException, timeout: float) -> CatalogBusyError | None:
    """The clear error for a SQLite 'database is locked' failure, or None when ``exc`` is something else."""
    message = str(getattr(exc, "orig", exc)).lower()
    if not isinstance(exc, OperationalError) or ("locked" not in message and "busy" not in message):
        return None
    return CatalogBusyError(
        f"the catalog is busy: another handlens command (an import, a training run, the service) has held "
        f"its write lock for over {timeout:g} s; wait for it to finish and retry"
    )


def _add_new_tables(engine: Engine) -> None:
    """1 -> 2 (``runs``), 2 -> 3 (``annotations``), 3 -> 4 (``jobs``, ``url_items``), 4 -> 5 (``boxes``,
    ``box_labels``): new tables, created by ``create_all``."""
    Base.metadata.create_all(engine)


#: version -> step that upgrades a catalog from ``version`` to ``version + 1``.
MIGRATIONS: dict[int, Callable[[Engine], None]] = {1: _add_new_tables, 2: _add_new_tables, 3: _add_new_tables,
                                                   4: _add_new_tables}


@dataclass
class Catalog:
    """A live connection to one catalog database."""

    url: str
    engine: Engine
    _sessions: sessionmaker[Session]
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends normally, rolled back on error.

        A lock held by another command surfaces as SQLAlchemy's ``OperationalError`` (callers such as the
        training run's retries and the service's 503 handler expect it); :meth:`write_session` turns it
        into :class:`CatalogBusyError`.
        """
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A short write transaction that first takes the write lock (SQLite ``BEGIN IMMEDIATE``).

        What the block reads is then current (no other writer can commit in between), and its writes
        cannot fail half-way for a lock: waiting happens up front, up to the busy timeout, after which
        :class:`CatalogBusyError` is raised with nothing written. Other databases: a plain transaction.
        """
        try:
            with self.session() as session:
                if self.engine.dialect.name == "sqlite":
                    session.connection().exec_driver_sql("BEGIN IMMEDIATE")
                yield session
        except OperationalError as exc:
            busy = busy_error(exc, self.busy_timeout)
            if busy is None:
                raise
            raise busy from exc

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(busy_timeout: float) -> Callable[..., None]:
    """The per-connection SQLite settings: wait ``busy_timeout`` seconds for a lock, WAL (readers never
    block the writer), foreign keys."""

    def apply(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={max(0, int(busy_timeout * 1000))}")  # first: the rest may wait
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return apply


def open_catalog(url: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> Catalog:
    """Connect to the catalog at ``url``, creating or upgrading its tables as needed.

    ``busy_timeout``: seconds a SQLite connection waits for another command's write lock.
    """
    shown = _redacted(url)
    try:
        engine = create_engine(url, future=True)
    except Exception as exc:  # bad URL or missing driver
        raise InputError(f"cannot open catalog database {shown}: {exc}. Check --db / HANDLENS_DB_URL") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout))
    try:
        _ensure_schema(engine)
    except DBAPIError as exc:
        engine.dispose()
        busy = busy_error(exc, busy_timeout)
        if busy is not None:
            raise busy from exc
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise InputError(
            f"cannot connect to catalog database {shown}: {reason}. Check that the server runs and the URL "
            "(--db / HANDLENS_DB_URL) is right"
        ) from exc
    return Catalog(url=url, engine=engine, _sessions=sessionmaker(engine, expire_on_commit=False),
                   busy_timeout=busy_timeout)


def _redacted(url: str) -> str:
    """The URL as it may be shown to a user: any password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable URL)"


def _ensure_schema(engine: Engine) -> None:
    tables = set(inspect(engine).get_table_names())
    if "schema_version" not in tables:
        if tables & {"datasets", "images"}:
            raise CatalogVersionError(
                "this database holds tables but no handlens schema version; point --db at a new database"
            )
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add(SchemaVersion(id=1, version=SCHEMA_VERSION))
            session.commit()
        return
    with Session(engine) as session:
        row = session.scalars(select(SchemaVersion)).first()
        version = row.version if row else 0
    if version > SCHEMA_VERSION:
        raise CatalogVersionError(
            f"the catalog has schema version {version}, newer than this handlens ({SCHEMA_VERSION}); "
            "upgrade handlens to open it"
        )
    while version < SCHEMA_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise CatalogVersionError(f"no migration from catalog schema version {version}")
        step(engine)
        version += 1
        with Session(engine) as session:
            session.get(SchemaVersion, 1).version = version  # type: ignore[union-attr]
            session.commit()
    Base.metadata.create_all(engine)  # new tables of this version, if any
