"""Train/test assignment: the paper's random image-level 80/20 and a group-aware 80/20.

Both are stratified by label and derived from a seeded hash of each image (or
group) id, so the assignment of an image depends only on the seed and the
set of images: re-running an ingest, or resuming one, gives the same split.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Sequence

import numpy as np

SCHEMES = ("random", "group")


def _rank_key(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def random_split(image_ids: Sequence[str], strata: Sequence[str], test_fraction: float = 0.2,
                 seed: int = 0) -> np.ndarray:
    """Image-level split: within each stratum (first label), the images ranked last go to test."""
    split = np.full(len(image_ids), "train", dtype=object)
    members: dict[str, list[int]] = defaultdict(list)
    for i, stratum in enumerate(strata):
        members[stratum].append(i)
    for rows in members.values():
        rows.sort(key=lambda r: _rank_key(seed, image_ids[r]))
        n_test = int(round(len(rows) * test_fraction))
        for r in rows[len(rows) - n_test:]:
            split[r] = "test"
    return split.astype(str)


def group_split(image_ids: Sequence[str], strata: Sequence[str], groups: Sequence[str | None],
                test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Group-aware split: every image of a group (patient, lesion) lands on the same side.

    Groups are stratified by their most frequent stratum; within a stratum, groups
    are taken in seeded hash order until about ``test_fraction`` of its images are
    in test. Images without a group form a group of their own.
    """
    keys = [g if g is not None else f"image:{i}" for g, i in zip(groups, image_ids)]
    rows_of: dict[str, list[int]] = defaultdict(list)
    for r, key in enumerate(keys):
        rows_of[key].append(r)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for key, rows in rows_of.items():
        counts: dict[str, int] = defaultdict(int)
        for r in rows:
            counts[strata[r]] += 1
        majority = max(sorted(counts), key=lambda s: counts[s])
        by_stratum[majority].append(key)
    split = np.full(len(image_ids), "train", dtype=object)
    for group_keys in by_stratum.values():
        group_keys.sort(key=lambda k: _rank_key(seed, k), reverse=True)
        target = test_fraction * sum(len(rows_of[k]) for k in group_keys)
        in_test = 0
        for key in group_keys:
            size = len(rows_of[key])
            # take the group if that brings the test count closer to the target
            if abs(in_test + size - target) < abs(in_test - target):
                for r in rows_of[key]:
                    split[r] = "test"
                in_test += size
    return split.astype(str)


def check_group_disjoint(split: Sequence[str], groups: Sequence[str]) -> list[str]:
    """Groups found on more than one side of ``split`` (empty when the split is group-disjoint)."""
    sides: dict[str, set[str]] = defaultdict(set)
    for s, g in zip(split, groups):
        sides[g].add(s)
    return sorted(g for g, s in sides.items() if len(s) > 1)
