"""core.faults, the one fault-injection mechanism: off unless armed, fires once per marker,
matches on its point, step and rank, and refuses a point no stage code marks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from steelworks.core import faults
from steelworks.core.faults import fault


def _fire_in_child(armed: list[dict], point: str, **where: int) -> int:
    code = (f"from steelworks.core import faults; faults.fire({armed!r}, {point!r}, **{where!r}); "
            "print('survived')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode


def test_off_unless_armed(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.from_env() == []
    faults.fire(None, "train.step", step=1, rank=0)  # returns: nothing armed
    faults.fire([], "data.clean")


def test_fires_once_where_it_matches(tmp_path):
    marker = tmp_path / "m"
    armed = [fault("train.step", marker, step=6, rank=1)]
    assert _fire_in_child(armed, "train.step", step=5, rank=1) == 0  # another step
    assert _fire_in_child(armed, "train.step", step=6, rank=0) == 0  # another rank
    assert _fire_in_child(armed, "train.save", step=6, rank=1) == 0  # another point
    assert not marker.exists()
    assert _fire_in_child(armed, "train.step", step=6, rank=1) == faults.EXIT_CODE
    pid = int(marker.read_text().split()[0])
    assert pid > 0
    assert _fire_in_child(armed, "train.step", step=6, rank=1) == 0  # the restart goes through


def test_rank_defaults_to_zero_for_train_points(tmp_path):
    armed = [fault("train.step", tmp_path / "m", step=2)]
    assert _fire_in_child(armed, "train.step", step=2, rank=1) == 0
    assert _fire_in_child(armed, "train.step", step=2, rank=0) == faults.EXIT_CODE


def test_env_round_trip(inject_faults, tmp_path):
    armed = fault("data.clean", tmp_path / "m")
    inject_faults(armed)
    assert faults.from_env() == [armed]


def test_unknown_point_is_an_error():
    with pytest.raises(ValueError, match="unknown fault point 'train.stpe'"):
        fault("train.stpe", "/tmp/m", step=1)
