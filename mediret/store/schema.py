"""The store's DuckDB schema: every table, and the column types rows are inserted with."""

from __future__ import annotations

DB_FILE = "mediret.duckdb"
SCHEMA_VERSION = 1

TABLES = """
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS encoders (
    name TEXT PRIMARY KEY, dim INTEGER, preprocess TEXT, weights_source TEXT,
    metric TEXT, index_file TEXT, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS images (
    id BIGINT PRIMARY KEY, image_id TEXT UNIQUE, source TEXT, dataset TEXT,
    group_id TEXT, given_split TEXT, content_hash TEXT, width INTEGER, height INTEGER,
    meta JSON, ingest_run INTEGER);
CREATE TABLE IF NOT EXISTS labels (id BIGINT, label TEXT);
CREATE TABLE IF NOT EXISTS label_names (label TEXT PRIMARY KEY, position INTEGER);
CREATE TABLE IF NOT EXISTS splits (id BIGINT, scheme TEXT, split TEXT, PRIMARY KEY (id, scheme));
CREATE TABLE IF NOT EXISTS problems (
    ingest_run INTEGER, path TEXT, kind TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS ingest_runs (
    run INTEGER PRIMARY KEY, root TEXT, format TEXT, started_at TIMESTAMP,
    finished_at TIMESTAMP, added INTEGER, skipped INTEGER, problems INTEGER, seed INTEGER);
CREATE OR REPLACE VIEW groups AS
    SELECT group_id, count(*) AS n_images FROM images
    WHERE group_id IS NOT NULL GROUP BY group_id;
"""

# Created on first save, so that stores written before classifiers were kept still open read-only.
CLASSIFIERS_TABLE = """
CREATE TABLE IF NOT EXISTS classifiers (
    name TEXT PRIMARY KEY, kind TEXT, encoder TEXT, encoder_dim INTEGER, preprocess TEXT,
    weights_source TEXT, split TEXT, class_names JSON, multilabel BOOLEAN, score_source TEXT,
    params JSON, settings JSON, metrics JSON, n_train INTEGER, sklearn_version TEXT,
    created_at TIMESTAMP, model BLOB)
"""

IMAGE_TYPES = ("BIGINT", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "INTEGER", "INTEGER",
               "JSON", "INTEGER")

# What a --where condition may refer to (search's help and error messages).
IMAGE_COLUMNS = ("id, image_id, source, dataset, group_id, given_split, content_hash, width, "
                 "height, meta (JSON: e.g. meta->>'sex' = 'male'), ingest_run")
