"""Session fixtures shared by several test modules are registered once (tests/conftest.py), never imported."""

from __future__ import annotations

import types

from tests import spot_cluster_fixtures
from tests.spot_cluster_fixtures import group_shared_fixture_users, modules_redefining_shared_fixtures


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


class _Item:
    def __init__(self, *fixturenames):
        self.fixturenames = fixturenames
        self.markers = []

    def add_marker(self, marker):
        self.markers.append(marker)


def test_the_tests_of_the_spot_cluster_share_one_xdist_group():
    """Under `make test` (pytest-xdist, `--dist loadgroup`) every test of the spot cluster runs in one worker,
    so the session starts one cluster, not one per worker; other tests are left to either worker."""
    users = [_Item("tmp_path", "spot_cluster"), _Item("spot_cluster")]
    other = _Item("ray_local", "tmp_path")
    group_shared_fixture_users([*users, other])
    assert [[(m.name, m.args) for m in item.markers] for item in users] == [
        [("xdist_group", ("spot_cluster",))]
    ] * 2
    assert other.markers == []
