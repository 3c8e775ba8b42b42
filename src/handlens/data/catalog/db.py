"""Opening the catalog: engine, sessions and the schema-version check."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine, create_engine, event, inspect, make_url, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from handlens.core.errors import CatalogVersionError, InputError
from handlens.data.catalog.schema import SCHEMA_VERSION, Base, SchemaVersion


def _add_new_tables(engine: Engine) -> None:
    """1 -> 2 (``runs``) and 2 -> 3 (``annotations``): new tables, created by ``create_all``."""
    Base.metadata.create_all(engine)


#: version -> step that upgrades a catalog from ``version`` to ``version + 1``.
MIGRATIONS: dict[int, Callable[[Engine], None]] = {1: _add_new_tables, 2: _add_new_tables}  # 2 -> 3: annotations


@dataclass
class Catalog:
    """A live connection to one catalog database."""

    url: str
    engine: Engine
    _sessions: sessionmaker[Session]

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends normally, rolled back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def open_catalog(url: str) -> Catalog:
    """Connect to the catalog at ``url``, creating or upgrading its tables as needed."""
    shown = _redacted(url)
    try:
        engine = create_engine(url, future=True)
    except Exception as exc:  # bad URL or missing driver
        raise InputError(f"cannot open catalog database {shown}: {exc}. Check --db / HANDLENS_DB_URL") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        _ensure_schema(engine)
    except DBAPIError as exc:
        engine.dispose()
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise InputError(
            f"cannot connect to catalog database {shown}: {reason}. Check that the server runs and the URL "
            "(--db / HANDLENS_DB_URL) is right"
        ) from exc
    return Catalog(url=url, engine=engine, _sessions=sessionmaker(engine, expire_on_commit=False))


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
