"""Bundled demo models: scikit-learn classifiers trained on the datasets sklearn ships offline.

    tierserve compile tierserve_compiler.demo:digits_classifier --name digits \\
        --validation build/digits_val.npz

``python -m tierserve_compiler.demo OUT_DIR`` writes ``digits_val.npz`` and ``breast_cancer_val.npz``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

RANDOM_STATE = 0
TEST_SIZE = 0.25


def _split(loader: Any) -> tuple[Any, Any, Any, Any]:
    from sklearn.model_selection import train_test_split

    x, y = loader(return_X_y=True)
    return train_test_split(x.astype("float32"), y, test_size=TEST_SIZE, random_state=RANDOM_STATE, stratify=y)


def _fit(loader: Any) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, _, y_train, _ = _split(loader)
    clf = LogisticRegression(max_iter=2000, random_state=RANDOM_STATE)
    model = Pipeline([("scale", StandardScaler()), ("clf", clf)])
    return model.fit(x_train, y_train)


def _write_validation(loader: Any, path: Path) -> Path:
    import numpy as np

    _, x_test, _, y_test = _split(loader)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, input=x_test, _labels=y_test.astype("int64"))
    return path


def digits_classifier() -> Any:
    """Pipeline(StandardScaler, LogisticRegression) fitted on 75 % of ``load_digits`` (64 features, 10 classes)."""
    from sklearn.datasets import load_digits

    return _fit(load_digits)


def write_digits_validation(path: Path) -> Path:
    """The held-out 25 % of ``load_digits`` as ``input`` + ``_labels``."""
    from sklearn.datasets import load_digits

    return _write_validation(load_digits, path)


def breast_cancer_classifier() -> Any:
    """Pipeline(StandardScaler, LogisticRegression) on ``load_breast_cancer`` (30 features, 2 classes)."""
    from sklearn.datasets import load_breast_cancer

    return _fit(load_breast_cancer)


def write_breast_cancer_validation(path: Path) -> Path:
    from sklearn.datasets import load_breast_cancer

    return _write_validation(load_breast_cancer, path)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build")
    print(write_digits_validation(out / "digits_val.npz"))
    print(write_breast_cancer_validation(out / "breast_cancer_val.npz"))
