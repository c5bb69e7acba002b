"""The store: one directory holding an encoder's FAISS vectors and a DuckDB database of the
images (labels, groups, splits, problems, classifiers), kept consistent. See ``core``."""

from .classifiers import SavedClassifier
from .core import (SPLIT_SCHEMES, EncoderInfo, LabelledMatrix, RecordedProblem, SplitKey, Store,
                   StoredImage)
from .filters import FieldCondition, Filters
from .schema import DB_FILE, IMAGE_COLUMNS

__all__ = ["DB_FILE", "IMAGE_COLUMNS", "SPLIT_SCHEMES", "EncoderInfo", "FieldCondition", "Filters",
           "LabelledMatrix", "RecordedProblem", "SavedClassifier", "SplitKey", "Store", "StoredImage"]
