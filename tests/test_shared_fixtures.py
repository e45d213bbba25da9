"""Session fixtures shared by several test modules are registered once (tests/conftest.py), never imported."""

from __future__ import annotations

import types

from tests import spot_cluster_fixtures
from tests.spot_cluster_fixtures import modules_redefining_shared_fixtures


def test_a_module_that_imports_the_spot_cluster_fixture_is_named():
    """A test module holding `spot_cluster` (imported) is named; one that only names it as an argument is not."""
    importing = types.ModuleType("tests.test_importing")
    importing.spot_cluster = spot_cluster_fixtures.spot_cluster
    importing.start_driver = spot_cluster_fixtures.start_driver
    clean = types.ModuleType("tests.test_clean")
    clean.start_driver = spot_cluster_fixtures.start_driver
    assert modules_redefining_shared_fixtures([importing, clean]) == ["tests.test_importing: spot_cluster"]


def test_the_spot_cluster_fixture_is_one_for_the_whole_session(request):
    """Every module that asks for `spot_cluster` gets the conftest-registered definition, session-scoped."""
    definitions = request._fixturemanager.getfixturedefs("spot_cluster", request.node)
    assert definitions is not None and len(definitions) == 1
    assert definitions[0].scope == "session" and definitions[0].baseid == ""
