"""``python -m optax_amsgrad demo``: its end points, its figure, its errors."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from optax_amsgrad.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def parse_table(stdout: str) -> dict[tuple[str, str], tuple[float, float]]:
  """``{(problem, optimizer): (x_T, R_T / T)}`` from the demo's table."""
  rows = {}
  for line in stdout.splitlines():
    fields = line.split()
    if len(fields) == 4 and fields[0] in ("online", "stochastic"):
      rows[fields[0], fields[1]] = (float(fields[2]), float(fields[3]))
  return rows


def png_size(path: Path) -> tuple[int, int]:
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
  width, height = struct.unpack(">II", data[16:24])
  return width, height


def test_demo_prints_the_end_points_and_writes_figure1(tmp_path, capsys):
  figure = tmp_path / "figure1.png"
  status = main(["demo", "--steps", "1e6", "--progress", "never", "--plot", str(figure)])
  assert status == 0
  out = capsys.readouterr().out
  assert "b1 = 0.9, b2 = 0.99" in out
  assert "alpha_t = 1/sqrt(t)" in out
  rows = parse_table(out)
  assert set(rows) == {
      (p, o) for p in ("online", "stochastic") for o in ("Adam", "AMSGrad")
  }
  # Adam ends at the worst point x = +1, AMSGrad at the optimum x = -1.
  assert rows["online", "Adam"][0] > 0.99
  assert rows["online", "AMSGrad"][0] < -0.99
  assert rows["stochastic", "Adam"][0] > 0.9
  assert rows["stochastic", "AMSGrad"][0] < -0.8
  # Adam's average regret stays away from 0, AMSGrad's is much smaller.
  assert rows["online", "Adam"][1] > 0.15
  assert rows["online", "AMSGrad"][1] < 0.5 * rows["online", "Adam"][1]
  assert rows["stochastic", "AMSGrad"][1] < 0.5 * rows["stochastic", "Adam"][1]
  # Three panels side by side.
  width, height = png_size(figure)
  assert width > 2.5 * height
  assert figure.stat().st_size > 20_000


def test_progress_bar_reaches_the_end(capsys):
  assert main(["demo", "--steps", "20_000", "--progress", "always"]) == 0
  err = capsys.readouterr().err
  assert "100.0%" in err
  assert "80,000/80,000 steps" in err


def test_no_progress_bar_when_not_on_a_terminal(capsys):
  assert main(["demo", "--steps", "2000"]) == 0
  assert "steps" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["train"], "invalid choice"),
        (["demo", "--steps", "0"], "--steps: must be between 1"),
        (["demo", "--steps", "-5"], "--steps: must be between 1"),
        (["demo", "--steps", "ten"], "--steps: expected an integer"),
        (["demo", "--steps", "1.5"], "--steps: expected an integer"),
        (["demo", "--steps", str(2**31)], "--steps: must be between 1"),
        (["demo", "--seed", "-1"], "--seed: must be between 0"),
        (["demo", "--seed", "x"], "--seed: expected an integer"),
        (["demo", "--alpha", "0"], "--alpha: must be a finite number > 0"),
        (["demo", "--alpha", "nan"], "--alpha: must be a finite number > 0"),
        (["demo", "--convention", "tf"], "invalid choice"),
        (["demo", "--plot", "figure.xyz"], "must end in one of"),
        (["demo", "--plot", "no/such/folder/f.png"], "does not exist"),
        (["demo", "--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert message in captured.err
  assert captured.out == ""


def test_plot_to_a_folder_is_refused(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["demo", "--plot", str(tmp_path)])
  assert exit_info.value.code == 2
  assert "is a folder" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path, capsys):
  # A None entry in sys.modules makes the import fail as if not installed.
  for name in ("matplotlib", "matplotlib.backend_bases", "matplotlib.figure"):
    monkeypatch.setitem(sys.modules, name, None)
  with pytest.raises(SystemExit) as exit_info:
    main(["demo", "--steps", "100", "--plot", str(tmp_path / "f.png")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "--plot needs matplotlib" in err
  assert "pip install matplotlib" in err
  assert not (tmp_path / "f.png").exists()
  # Without --plot the demo needs only the runtime dependencies.
  assert main(["demo", "--steps", "1000"]) == 0
  assert len(parse_table(capsys.readouterr().out)) == 4


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "optax_amsgrad", *args],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False,
  )


def test_python_dash_m_runs_the_demo():
  result = run_module("demo", "--steps", "300000", "--seed", "1")
  assert result.returncode == 0, result.stderr
  rows = parse_table(result.stdout)
  # Adam's x_t dips for a few steps after each large gradient.
  assert rows["online", "Adam"][0] > 0.95
  assert rows["online", "AMSGrad"][0] < -0.99
  bad = run_module("demo", "--steps=-3")
  assert bad.returncode == 2
  assert "--steps: must be between 1" in bad.stderr
