"""Fixtures of the integration ring."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration import test_api_helpers as h


@pytest.fixture
def api(db_url: str) -> Iterator[h.Api]:
    """The API app in process (httpx's ASGI transport), signed in as the test account."""
    with h.client(db_url) as c:
        c.headers.update(h.auth())
        yield c
