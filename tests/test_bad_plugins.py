"""Plug-in errors are one line naming the plug-in and the spec field, also when raised inside Ray tasks and
actors; `lcsc-ray validate` imports the plug-ins; tracebacks only with `--verbose`."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from lcsc_ray.cli import main as lcsc_main
from lcsc_ray.plugins import build, resolve
from rayops import cli as rayops_cli
from schemas.common import PluginSpec
from schemas.errors import PluginError


def _spec_file(tmp_path, model_target: str):
    path = tmp_path / "s.yaml"
    path.write_text(f"model:\n  target: {model_target}\noutput:\n  uri: {tmp_path / 'out'}\n")
    return path


def test_validate_imports_plugins_and_names_the_field(tmp_path):
    """A typo in `model.target` fails `lcsc-ray validate` with exit 2 and one line, no traceback."""
    result = CliRunner().invoke(
        lcsc_main, ["validate", str(_spec_file(tmp_path, "lcsc_ray.recipes.mnist:build_unett"))]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "lcsc_ray.recipes.mnist:build_unett" in lines[0] and "`model.target`" in lines[0]


def test_validate_accepts_importable_plugins(tmp_path):
    """A spec whose plug-ins import validates with exit 0."""
    result = CliRunner().invoke(
        lcsc_main, ["validate", str(_spec_file(tmp_path, "lcsc_ray.recipes.mnist:build_unet"))]
    )
    assert result.exit_code == 0, result.output


def test_module_failing_at_import_is_a_plugin_error(tmp_path, monkeypatch):
    """A plug-in module that raises while importing gives a PluginError carrying its error on one line."""
    (tmp_path / "broken_plugin_mod.py").write_text("VALUE = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as info:
        resolve("broken_plugin_mod:f", "sampler")
    assert "`sampler.target`" in str(info.value) and "ZeroDivisionError: division by zero" in str(info.value)


def test_plugin_failing_to_build_names_field_and_error():
    """A plug-in whose call raises (wrong kwargs) is a PluginError naming target, field and the cause."""
    with pytest.raises(PluginError) as info:
        build(PluginSpec(target="numpy:arange", kwargs={"nope": 1}), "fid.features")
    message = str(info.value)
    assert "'numpy:arange' (`fid.features.target`) failed to build" in message and "TypeError" in message
    assert "\n" not in message


def _build_bad_plugin():
    return build(PluginSpec(target="tests.lcsc_plugins:no_such_builder"), "model")


class _Builder:
    def __init__(self):
        self.model = _build_bad_plugin()

    def ping(self) -> int:
        return 1


@pytest.fixture(autouse=True)
def _pickle_this_module_by_value():
    """Ray workers cannot import this test module by name: ship its functions and classes by value."""
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def _exit_of(fn, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        rayops_cli.run_or_exit(fn)
    return info.value.code, capsys.readouterr().err


def _error_line(fn, capsys) -> tuple[int, str]:
    """The exit code and the one `error:` line (Ray may also forward the worker's own log lines to stderr)."""
    code, err = _exit_of(fn, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert not any(line.startswith("Traceback") for line in err.splitlines()), (
        err
    )  # ours: not prefixed by Ray
    return code, lines[0]


def test_plugin_error_inside_a_ray_task_is_one_line(ray_local, capsys, monkeypatch):
    """A PluginError raised in a Ray task reaches the CLI as exit 2 and one line naming plug-in and field."""
    monkeypatch.setattr(rayops_cli, "_verbose", False)
    task = ray_local.remote(_build_bad_plugin)
    code, line = _error_line(lambda: ray_local.get(task.remote(), timeout=60), capsys)
    assert code == 2 and "tests.lcsc_plugins:no_such_builder" in line and "`model.target`" in line


def test_plugin_error_in_an_actor_constructor_is_one_line(ray_local, capsys, monkeypatch):
    """An actor whose constructor fails to build a plug-in gives exit 2 and the plug-in's message, one line."""
    monkeypatch.setattr(rayops_cli, "_verbose", False)
    actor = ray_local.remote(num_cpus=0)(_Builder).remote()
    code, line = _error_line(lambda: ray_local.get(actor.ping.remote(), timeout=60), capsys)
    assert code == 2 and "an actor failed to start" in line and "no_such_builder" in line
    assert "`model.target`" in line


def test_verbose_prints_the_traceback(ray_local, capsys, monkeypatch):
    """With --verbose the same error also prints the full traceback."""
    monkeypatch.setattr(rayops_cli, "_verbose", True)
    task = ray_local.remote(_build_bad_plugin)
    code, err = _exit_of(lambda: ray_local.get(task.remote(), timeout=60), capsys)
    assert code == 2 and "Traceback" in err and "no_such_builder" in err
