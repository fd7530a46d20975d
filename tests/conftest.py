"""Shared fixtures: small real slices of the shared data (tests/data), prepared once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parents[1]

# Nothing in the test run may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def art_office_csv() -> Path:
    return DATA / "amazon-art-office-mini"


@pytest.fixture(scope="session")
def food_kitchen_csv() -> Path:
    return DATA / "amazon-food-kitchen-mini"


@pytest.fixture(scope="session")
def art_office(tmp_path_factory, art_office_csv) -> Path:
    from crossrec.dataset import prepare

    out = tmp_path_factory.mktemp("prepared") / "ao"
    prepare([art_office_csv], out, progress=False)
    return out


@pytest.fixture(scope="session")
def food_kitchen(tmp_path_factory, food_kitchen_csv) -> Path:
    from crossrec.dataset import prepare

    out = tmp_path_factory.mktemp("prepared") / "fk"
    prepare([food_kitchen_csv], out, progress=False)
    return out
