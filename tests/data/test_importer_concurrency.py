"""Two commands on one SQLite catalog: imports commit in short transactions, a stuck lock is a clear error."""

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from handlens.data.catalog import CatalogBusyError, Run, open_catalog
from handlens.data.catalog import Image as ImageRow
from handlens.data.importer import import_path
from tests.conftest import write_image


def _tree(root: Path, n: int, seed: int) -> Path:
    for i in range(n):
        write_image(root / ("a" if i % 2 else "b") / f"img_{i:03d}.png", seed + i, (20, 20))
    return root


def test_two_imports_into_one_dataset_at_once_both_succeed(tmp_path):
    """The first import is slowed so it is mid-way (longer than SQLite's default 5 s lock wait) while the
    second one runs: with one transaction per import, the second died with 'database is locked'."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    open_catalog(url).close()
    trees = [_tree(tmp_path / "one", 40, 0), _tree(tmp_path / "two", 30, 1000)]
    second_may_start = threading.Event()
    results: dict[int, object] = {}

    def slow(done: int, _total: int) -> None:
        if done == 5:
            second_may_start.set()
        time.sleep(0.15)  # 40 files: about 6 s

    def run(index: int) -> None:
        catalog = open_catalog(url)
        try:
            if index == 1:
                second_may_start.wait(30)
            results[index] = import_path(catalog, trees[index], "shared", workers=1, batch_size=4,
                                         progress=slow if index == 0 else None)
        except Exception as exc:  # reported below, with its type
            results[index] = exc
        finally:
            catalog.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [getattr(results.get(i), "added", results.get(i)) for i in range(2)] == [40, 30]
    catalog = open_catalog(url)
    with catalog.session() as session:
        assert session.scalar(select(func.count(ImageRow.id))) == 70
    catalog.close()


def test_the_same_tree_imported_twice_at_once_is_stored_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    open_catalog(url).close()
    tree = _tree(tmp_path / "tree", 24, 0)
    reports = []

    def run() -> None:
        catalog = open_catalog(url)
        reports.append(import_path(catalog, tree, "ds", workers=1, batch_size=3,
                                   progress=lambda *_: time.sleep(0.01)))
        catalog.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(reports) == 2
    assert sorted((r.added + r.unchanged, len(r.skipped)) for r in reports) == [(24, 0), (24, 0)]
    assert sum(r.added for r in reports) == 24
    catalog = open_catalog(url)
    with catalog.session() as session:
        assert session.scalar(select(func.count(ImageRow.id))) == 24
    catalog.close()


@pytest.fixture
def locked_catalog(tmp_path):
    """A catalog URL whose write lock another connection holds (as a stuck command would)."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    open_catalog(url).close()
    holder = sqlite3.connect(tmp_path / "catalog.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    yield url
    holder.rollback()
    holder.close()


def test_an_import_into_a_catalog_locked_too_long_is_a_clear_error(tmp_path, locked_catalog):
    catalog = open_catalog(locked_catalog, busy_timeout=0.2)
    tree = _tree(tmp_path / "tree", 4, 0)
    started = time.monotonic()
    with pytest.raises(CatalogBusyError, match=r"another handlens command .* wait for it to finish and retry"):
        import_path(catalog, tree, "ds", workers=1)
    assert time.monotonic() - started >= 3 * 0.2  # the batch was tried three times, each after a full wait
    with catalog.session() as session:  # reading still works: WAL readers never wait for the writer
        assert session.scalar(select(func.count(ImageRow.id))) == 0
    catalog.close()
    assert CatalogBusyError.http_status == 503


def test_a_write_session_on_a_locked_catalog_is_the_busy_error(locked_catalog):
    catalog = open_catalog(locked_catalog, busy_timeout=0.2)
    with pytest.raises(CatalogBusyError), catalog.write_session() as session:
        session.add(Run(id="r1", status="running", config={}))
    catalog.close()


def test_ctrl_c_keeps_the_committed_batches_and_says_so(tmp_path, catalog):
    from handlens.data.catalog import ImportRecord
    from handlens.data.importer import ImportInterrupted

    tree = _tree(tmp_path / "tree", 20, 0)

    def interrupt_at_ten(done: int, _total: int) -> None:
        if done == 10:
            raise KeyboardInterrupt

    with pytest.raises(ImportInterrupted, match="Committed before it stopped: 8 of 20 files") as caught:
        import_path(catalog, tree, "ds", workers=1, batch_size=4, progress=interrupt_at_ten)
    assert caught.value.exit_code == 130 and caught.value.report.added == 8
    with catalog.session() as session:
        assert session.scalar(select(func.count(ImageRow.id))) == 8
        record = session.scalars(select(ImportRecord)).one()  # the history keeps the partial import
        assert record.report["interrupted"] is True and record.report["committed"] == 8
    again = import_path(catalog, tree, "ds", workers=1, batch_size=4)
    assert (again.added, again.unchanged, again.committed) == (12, 8, 20)
