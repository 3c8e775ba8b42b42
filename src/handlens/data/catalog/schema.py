"""Catalog tables.

Images stay where they are: a row holds the absolute path, the SHA-256 of the file's bytes and what
decoding told us (size, mode, format). Labels live in *labelsets* so that one image can carry
several label schemes (e.g. Dunham and Lucia classes for the same thin section). Boxes (regions to
find before classifying) carry their own labelsets, by name, in ``box_labels``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: Bump when the tables change, and add a step to ``db.MIGRATIONS``.
SCHEMA_VERSION = 5


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    """One row: the schema version the catalog was last written with."""

    __tablename__ = "schema_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="dataset", cascade="all, delete-orphan")
    labelsets: Mapped[list[Labelset]] = relationship(back_populates="dataset", cascade="all, delete-orphan")


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("dataset_id", "path", name="uq_image_path"),
        Index("ix_images_sha256", "sha256"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    mode: Mapped[str] = mapped_column(String(16), nullable=False)
    format: Mapped[str] = mapped_column(String(16), nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    #: file modification time at import: an unchanged (path, bytes, mtime) is not decoded again.
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    group: Mapped[str | None] = mapped_column("group_name", String(200), nullable=True)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    dataset: Mapped[Dataset] = relationship(back_populates="images")
    labels: Mapped[list[Label]] = relationship(back_populates="image", cascade="all, delete-orphan")
    tags: Mapped[list[Tag]] = relationship(back_populates="image", cascade="all, delete-orphan")


class Labelset(Base):
    __tablename__ = "labelsets"
    __table_args__ = (UniqueConstraint("dataset_id", "name", name="uq_labelset_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)

    dataset: Mapped[Dataset] = relationship(back_populates="labelsets")


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("image_id", "labelset_id", name="uq_label_per_labelset"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), nullable=False)
    labelset_id: Mapped[int] = mapped_column(ForeignKey("labelsets.id", ondelete="CASCADE"), nullable=False)
    label: Mapped[str] = mapped_column(String(200), nullable=False)

    image: Mapped[Image] = relationship(back_populates="labels")
    labelset: Mapped[Labelset] = relationship()


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("image_id", "tag", name="uq_tag"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), nullable=False)
    tag: Mapped[str] = mapped_column(String(200), nullable=False)

    image: Mapped[Image] = relationship(back_populates="tags")


class ImportRecord(Base):
    """Every import keeps its full report, skipped files and their reasons included: nothing is lost."""

    __tablename__ = "imports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)


class Split(Base):
    """A named partition of one dataset under one labelset; the newest is the default for training."""

    __tablename__ = "splits"
    __table_args__ = (UniqueConstraint("dataset_id", "name", name="uq_split_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    labelset_id: Mapped[int] = mapped_column(ForeignKey("labelsets.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: ratios, seed, group_by, folds, min/max per class: everything needed to redo the split.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    #: {fold: {class: weight}}: inverse-frequency weights from that fold's train subset.
    class_weights: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    #: leakage and other findings at split time.
    report: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)

    labelset: Mapped[Labelset] = relationship()


class SplitAssignment(Base):
    """Which subset (train/val/test) an image belongs to in one fold of a split."""

    __tablename__ = "split_assignments"
    __table_args__ = (
        UniqueConstraint("split_id", "fold", "image_id", name="uq_assignment"),
        Index("ix_assignment_split_fold", "split_id", "fold"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    split_id: Mapped[int] = mapped_column(ForeignKey("splits.id", ondelete="CASCADE"), nullable=False)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), nullable=False)
    fold: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    subset: Mapped[str] = mapped_column(String(8), nullable=False)


class Run(Base):
    """A training run (schema version 2): its config, status, bundle and metrics."""

    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True)
    split_name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), nullable=False)  # running, finished, failed
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    bundle_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tracking: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Annotation(Base):
    """An expert region on one image (schema version 3): a binary mask file or polygons in pixel coordinates."""

    __tablename__ = "annotations"
    __table_args__ = (Index("ix_annotations_image", "image_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # mask | polygon
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    mask_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    polygons: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    source: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """A queued unit of work (schema version 4): train, study, evaluate, explain or import-urls.

    The row is the job's truth whoever runs it (the service's local worker or a Celery worker on another
    machine): its status, attempts, the host running it, progress for the events stream, a cancel request
    the running code checks each epoch, and the result (run id, bundle). The local executor's queue *is*
    this table, so a restarted service resumes it.
    """

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    queue: Mapped[str] = mapped_column(String(64), nullable=False, default="default")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)  # queued running finished failed cancelled
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    executor: Mapped[str] = mapped_column(String(16), nullable=False, default="local")  # local | celery
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)  # host:pid of the latest attempt
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    log_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: what the events stream shows: epoch, epochs, metrics, eta_seconds, message.
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: run_id, bundle, and the kind's own summary.
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class UrlItem(Base):
    """One row of an ``import-urls`` manifest (schema version 4): the ledger that makes a rerun exact.

    ``status``: pending, downloaded (validated and in the catalog), duplicate (same SHA-256 as an image
    already held), failed (retries spent; ``--retry-failed`` tries again), refused (never retried: a
    redirect off loopback, a licence the filter rejects, not an image).
    """

    __tablename__ = "url_items"
    __table_args__ = (UniqueConstraint("dataset_id", "url", name="uq_url_item"),
                      Index("ix_url_items_status", "dataset_id", "status"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    label: Mapped[str] = mapped_column(String(200), nullable=False)
    labelset: Mapped[str] = mapped_column(String(200), nullable=False)
    group: Mapped[str | None] = mapped_column("group_name", String(200), nullable=True)
    license: Mapped[str | None] = mapped_column(Text, nullable=True)
    attribution: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Box(Base):
    """An axis-aligned box on one image (schema version 5), in the image's pixel coordinates.

    ``x0 < x1`` and ``y0 < y1``, inside ``0..width`` and ``0..height`` (checked at import). Its labels live in
    :class:`BoxLabel`, one per labelset, so one box can be a "sigma-clast" for detection and "cw" for a
    rotation classifier.
    """

    __tablename__ = "boxes"
    __table_args__ = (Index("ix_boxes_image", "image_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), nullable=False)
    x0: Mapped[float] = mapped_column(Float, nullable=False)
    y0: Mapped[float] = mapped_column(Float, nullable=False)
    x1: Mapped[float] = mapped_column(Float, nullable=False)
    y1: Mapped[float] = mapped_column(Float, nullable=False)
    #: the annotation file the box came from
    source: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    labels: Mapped[list[BoxLabel]] = relationship(back_populates="box", cascade="all, delete-orphan")


class BoxLabel(Base):
    """A box's label in one labelset (schema version 5). Box labelsets are named here, not rows of
    ``labelsets``: those are per dataset and describe whole images, which splits and training read."""

    __tablename__ = "box_labels"
    __table_args__ = (UniqueConstraint("box_id", "labelset", name="uq_box_label_per_labelset"),
                      Index("ix_box_labels_labelset", "labelset"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    box_id: Mapped[int] = mapped_column(ForeignKey("boxes.id", ondelete="CASCADE"), nullable=False)
    labelset: Mapped[str] = mapped_column(String(200), nullable=False)
    label: Mapped[str] = mapped_column(String(200), nullable=False)

    box: Mapped[Box] = relationship(back_populates="labels")
