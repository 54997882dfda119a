"""The tiny model served once per test module that asks for `server` (see tests/fixtures/serving.py)."""

from __future__ import annotations

import pytest

from tests.fixtures.adapters import make_adapter
from tests.fixtures.serving import running


@pytest.fixture(scope="package")
def strong_adapter(tiny_model_dir, tmp_path_factory):
    # A strong adapter: the random tiny model alone ends every answer at once.
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "adapter", scale=1.0)


@pytest.fixture(scope="module")
def url(served):
    """The base URL of the module's `served` model, running on a free 127.0.0.1 port."""
    from tunepipe.serve.app import create_app

    with running(create_app(served), served) as base:
        yield base
