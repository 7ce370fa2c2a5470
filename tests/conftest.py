import os
import shutil
from pathlib import Path

import pytest

from helpers import REPO, at_root
from medqa_zh import config, data

SHARED_MEDQA = Path(os.environ.get("MEDQA_SHARED_DIR", REPO.parent / "shared" / "medqa"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Tests see no MEDQA_* settings from the shell that runs them."""
    for var in ("MEDQA_DIR", "MEDQA_BASE_MODEL", "MEDQA_EMBEDDER", "MEDQA_PROFILE", "MEDQA_ROOT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A throwaway project root (profiles + pyproject) so runs write under tmp, not the repo."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "profiles", root / "profiles")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    monkeypatch.setenv("MEDQA_ROOT", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from medqa_zh import tiny

    return tiny.build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def shared_medqa():
    if not (SHARED_MEDQA / "questions" / "Mainland" / "dev.jsonl").is_file():
        pytest.skip(f"real MedQA not found at {SHARED_MEDQA} (set MEDQA_SHARED_DIR to run this test)")
    return SHARED_MEDQA


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """A project with the smoke assets built and the clean splits written, as notebook 01 leaves it."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "profiles", root / "profiles")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    with at_root(root):
        data.ensure_splits(config.setup("smoke"))
    return root


@pytest.fixture
def smoke(smoke_root, monkeypatch):
    """``smoke(**overrides)`` -> the smoke Config of the module's project."""
    monkeypatch.setenv("MEDQA_ROOT", str(smoke_root))
    return lambda **overrides: config.load("smoke", overrides)
