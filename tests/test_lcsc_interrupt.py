"""Ctrl-C during a search: Tune returns early with unfinished trials; the search stops instead of going on."""

from types import SimpleNamespace

import pytest

from lcsc_ray.tuning import SearchInterrupted, check_finished
from rayops.cli import EXIT_INTERRUPTED, run_or_exit


class _Grid(SimpleNamespace):
    def __len__(self) -> int:
        return self.total


def test_a_grid_with_unfinished_trials_stops_the_search_naming_the_phase():
    """Two of five trials neither finished nor failed (Tune caught Ctrl-C): the search raises, naming the phase."""
    with pytest.raises(SearchInterrupted, match=r"optimizer phase \(2 trial"):
        check_finished(_Grid(total=5, num_terminated=2, num_errors=1), "optimizer")


def test_a_finished_grid_with_failed_trials_goes_on():
    """Every trial terminated or errored: no interruption is reported."""
    check_finished(_Grid(total=5, num_terminated=3, num_errors=2), "seeds")


def test_the_cli_turns_an_interrupt_into_one_line_and_exit_130(capsys):
    """An interrupted search prints one line telling how to resume and exits 130, without a traceback."""

    def interrupted():
        raise SearchInterrupted("the search was interrupted; rerun the same command to resume")

    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(interrupted)
    assert exit_info.value.code == EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: the search was interrupted") and "Traceback" not in err
