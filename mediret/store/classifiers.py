"""Fitted classifiers kept in a store's ``classifiers`` table, with what they were trained on."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .schema import CLASSIFIERS_TABLE

_LISTED = ("name, kind, encoder, encoder_dim, preprocess, weights_source, split, class_names, "
           "multilabel, score_source, params, metrics, n_train, created_at")


@dataclass
class SavedClassifier:
    """A fitted classifier as kept in a store; ``model`` is None until loaded."""

    name: str
    kind: str
    encoder: dict[str, Any]
    split: str
    class_names: list[str]
    multilabel: bool
    score_source: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    n_train: int
    created_at: datetime
    model: Any = field(repr=False, default=None)


class ClassifierTable:
    """``store.classifiers``: save, list and load fitted models. Models are pickles: load
    only stores you trust, as you would any pickle."""

    def __init__(self, con):
        self._con = con

    def save(self, saved: SavedClassifier, settings: dict[str, Any], sklearn_version: str) -> None:
        """Keep ``saved`` (with its model) under its name, replacing one of that name, in one transaction."""
        con = self._con
        con.execute("BEGIN")
        try:
            con.execute(CLASSIFIERS_TABLE)
            con.execute("DELETE FROM classifiers WHERE name = ?", [saved.name])
            enc = saved.encoder
            con.execute(
                "INSERT INTO classifiers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [saved.name, saved.kind, enc["name"], enc["dim"], enc["preprocess"],
                 enc["weights_source"], saved.split, json.dumps(saved.class_names), saved.multilabel,
                 saved.score_source, json.dumps(saved.params, default=str), json.dumps(settings),
                 json.dumps(saved.metrics), saved.n_train, sklearn_version,
                 saved.created_at or datetime.now(timezone.utc).replace(tzinfo=None),
                 pickle.dumps(saved.model, protocol=pickle.HIGHEST_PROTOCOL)])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise

    def list(self) -> list[SavedClassifier]:
        """The saved classifiers, newest first, without their models."""
        exists = self._con.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_name = 'classifiers' "
            "AND table_catalog = current_database()").fetchall()
        if not exists:
            return []
        rows = self._con.execute(f"SELECT {_LISTED} FROM classifiers ORDER BY created_at DESC, name").fetchall()
        return [_saved(row) for row in rows]

    def load_model(self, name: str) -> Any:
        """The unpickled model of the classifier ``name``."""
        return pickle.loads(self._con.execute("SELECT model FROM classifiers WHERE name = ?", [name]).fetchone()[0])


def _saved(row: tuple) -> SavedClassifier:
    (name, kind, encoder, dim, preprocess, weights, split, class_names, multilabel, source,
     params, metrics, n_train, created_at) = row
    return SavedClassifier(
        name=name, kind=kind, split=split, class_names=json.loads(class_names),
        encoder={"name": encoder, "dim": dim, "preprocess": preprocess, "weights_source": weights},
        multilabel=bool(multilabel), score_source=source, params=json.loads(params),
        metrics=json.loads(metrics), n_train=n_train, created_at=created_at)
