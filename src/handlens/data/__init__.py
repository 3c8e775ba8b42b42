"""Datasets: the catalog, import and validation, statistics, splits, demo data."""
