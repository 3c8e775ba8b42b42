import pytest
from sqlalchemy import text

from handlens.core.errors import CatalogVersionError
from handlens.data.catalog import SCHEMA_VERSION, open_catalog


def test_new_catalog_records_its_schema_version(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    catalog = open_catalog(url)
    with catalog.engine.connect() as conn:
        assert conn.execute(text("select version from schema_version")).scalar() == SCHEMA_VERSION
    catalog.close()
    open_catalog(url).close()  # opening again is fine


def test_catalog_from_a_newer_handlens_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    catalog = open_catalog(url)
    with catalog.engine.begin() as conn:
        conn.execute(text("update schema_version set version = :v"), {"v": SCHEMA_VERSION + 1})
    catalog.close()
    with pytest.raises(CatalogVersionError, match="upgrade handlens"):
        open_catalog(url)


def test_foreign_database_is_not_taken_over(tmp_path):
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("create table images (id integer)")
    with pytest.raises(CatalogVersionError, match="new database"):
        open_catalog(f"sqlite:///{path}")


def test_unreachable_database_is_a_clear_error_without_the_password(tmp_path):
    from handlens.core.errors import InputError

    with pytest.raises(InputError, match="cannot connect to catalog database") as caught:
        open_catalog(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    assert "Check that the server runs" in str(caught.value)
    with pytest.raises(InputError) as caught:
        open_catalog("postgresql+nosuchdriver://user:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)


def test_version_one_catalog_is_migrated(tmp_path):
    """A catalog written before the runs table existed gains it, with its data kept."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    catalog = open_catalog(url)
    with catalog.engine.begin() as conn:
        conn.execute(text("insert into datasets (name, description, created_at) values ('old', '', '2026-01-01')"))
        conn.execute(text("drop table runs"))
        conn.execute(text("update schema_version set version = 1"))
    catalog.close()
    upgraded = open_catalog(url)
    with upgraded.engine.connect() as conn:
        assert conn.execute(text("select version from schema_version")).scalar() == SCHEMA_VERSION
        assert conn.execute(text("select count(*) from runs")).scalar() == 0
        assert conn.execute(text("select name from datasets")).scalar() == "old"
    upgraded.close()
