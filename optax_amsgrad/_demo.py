"""``python -m optax_amsgrad demo``: Adam against AMSGrad on the problems of
Reddi, Kale and Kumar (2018), Section 5, with the table and Figure 1."""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, cast

import jax
import numpy as np
import optax

from optax_amsgrad import _alias, problems
from optax_amsgrad._transform import Convention

DEFAULT_STEPS = 5_000_000
DEFAULT_ALPHA = 1.0
B1, B2 = 0.9, 0.99
# Enough points for a smooth curve at print resolution, and small in memory
# however long the run.
PLOT_POINTS = 1_000
# The bar is drawn only once a run has lasted this long, so that quick runs
# print nothing but their table.
PROGRESS_DELAY_S = 2.0
MAX_STEPS = 2**31 - 2
CONVENTIONS = typing.get_args(Convention)


def _count(text: str) -> int:
  """A positive step count: ``5000000``, ``5_000_000`` or ``5e6``."""
  try:
    value = int(text)
  except ValueError:
    try:
      number = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not number.is_integer():
      raise argparse.ArgumentTypeError(
          f"expected an integer, got {text!r}"
      ) from None
    value = int(number)
  if not 1 <= value <= MAX_STEPS:
    raise argparse.ArgumentTypeError(
        f"must be between 1 and {MAX_STEPS:,}, got {text!r}"
    )
  return value


def _seed(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
  if not 0 <= value < 2**32:
    raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {text!r}")
  return value


def _alpha(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
  return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
  """Adds the ``demo`` command to the ``python -m optax_amsgrad`` parser."""
  parser: argparse.ArgumentParser = subparsers.add_parser(
      "demo",
      help="Adam vs AMSGrad on the counterexamples of Reddi et al. (2018)",
      description=(
          "Runs optax.adam and optax_amsgrad.amsgrad on the online and the "
          "stochastic problem of Reddi, Kale and Kumar (ICLR 2018), Section 5: "
          "f_t(x) = 1010 x once every 101 steps (online) or with probability "
          "0.01 (stochastic), else -10 x, on F = [-1, 1], where the best point "
          "is x = -1. Both use b1=0.9, b2=0.99, eps=1e-8 and the step size "
          "alpha/sqrt(t), start at x_1 = 0 and are projected onto F after each "
          "step. Prints the final x_t and the average regret R_t/t; Adam ends "
          "near +1 (the worst point), AMSGrad near -1."
      ),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
      "--steps", type=_count, default=DEFAULT_STEPS, metavar="N",
      help="number of steps t of each run (5e6 and 5_000_000 are accepted)",
  )
  parser.add_argument(
      "--seed", type=_seed, default=0,
      help="seed of the stochastic problem's PRNG key",
  )
  parser.add_argument(
      "--alpha", type=_alpha, default=DEFAULT_ALPHA,
      help="step size scale: step t uses alpha/sqrt(t)",
  )
  parser.add_argument(
      "--convention", choices=CONVENTIONS, default="pytorch",
      help="AMSGrad convention; 'pytorch' differs from optax.adam only by the "
      "maximum",
  )
  parser.add_argument(
      "--plot", type=Path, metavar="FILE.png",
      help="also write the three panels of the paper's Figure 1 to this file "
      "(needs matplotlib)",
  )
  parser.add_argument(
      "--progress", choices=("auto", "always", "never"), default="auto",
      help="progress bar on stderr: 'auto' draws it on a terminal once the "
      "runs last more than a couple of seconds",
  )
  parser.set_defaults(func=main)
  return parser


class ProgressBar:
  """A dependency-free progress bar over several runs, fed by host callbacks."""

  def __init__(
      self, total: int, *, stream: TextIO, enabled: bool, delay_s: float
  ) -> None:
    self._total = total
    self._stream = stream
    self._enabled = enabled
    self._delay_s = delay_s
    self._start = time.monotonic()
    self._offset = 0
    self._done = 0
    self._drawn = False
    self._last_draw = -math.inf
    self._lock = threading.Lock()

  @property
  def enabled(self) -> bool:
    return self._enabled

  def next_run(self, steps_before: int) -> Callable[[Any], None]:
    """A callback for :func:`problems.run` that counts from ``steps_before``."""

    def callback(steps: Any) -> None:
      self.update(steps_before + int(np.asarray(steps)))

    return callback

  def update(self, done: int) -> None:
    with self._lock:
      self._done = max(self._done, done)
      if not self._enabled:
        return
      now = time.monotonic()
      if now - self._start < self._delay_s:
        return
      if now - self._last_draw < 0.1 and self._done < self._total:
        return
      self._last_draw = now
      self._draw(now)

  def _draw(self, now: float) -> None:
    fraction = self._done / self._total
    width = 30
    filled = int(width * fraction)
    bar = "#" * filled + "-" * (width - filled)
    self._stream.write(
        f"\r[{bar}] {100 * fraction:5.1f}%  {self._done:,}/{self._total:,} steps"
        f"  {now - self._start:5.1f} s"
    )
    self._stream.flush()
    self._drawn = True

  def close(self) -> None:
    with self._lock:
      if self._drawn:
        self._stream.write("\n")
        self._stream.flush()


def _check_plot_path(parser: argparse.ArgumentParser, path: Path) -> None:
  """Fails before any run when the figure could not be written."""
  try:
    from matplotlib.backend_bases import FigureCanvasBase
  except ImportError:
    parser.error(
        "--plot needs matplotlib, which is not installed. Install it with "
        "\"pip install matplotlib\" (or \"pip install 'optax-amsgrad[notebooks]'\"), "
        "or leave out --plot."
    )
  if path.is_dir():
    parser.error(f"--plot {str(path)!r} is a folder, not a file name.")
  formats = FigureCanvasBase.get_supported_filetypes()
  suffix = path.suffix.lower().lstrip(".")
  if suffix not in formats:
    parser.error(
        f"--plot {str(path)!r}: the file name must end in one of "
        f"{', '.join('.' + f for f in sorted(formats))} (for example figure1.png)."
    )
  folder = path.parent
  if not folder.is_dir():
    parser.error(f"--plot {str(path)!r}: the folder {str(folder)!r} does not exist.")


def run_all(
    steps: int,
    seed: int,
    alpha: float,
    convention: str,
    progress: ProgressBar | None = None,
) -> dict[tuple[str, str], problems.Trajectory]:
  """Adam and AMSGrad on the online and the stochastic problem."""
  schedule = problems.inverse_sqrt_schedule(alpha)
  optimizers = {
      "Adam": optax.adam(schedule, b1=B1, b2=B2),
      "AMSGrad": _alias.amsgrad(
          schedule, b1=B1, b2=B2, convention=cast(Convention, convention)
      ),
  }
  runs = [
      (problem, name, optimizer)
      for problem in (problems.online(), problems.stochastic())
      for name, optimizer in optimizers.items()
  ]
  record_every = max(1, steps // PLOT_POINTS)
  key = jax.random.key(seed)
  results = {}
  for index, (problem, name, optimizer) in enumerate(runs):
    results[problem.name, name] = jax.device_get(
        problems.run(
            problem,
            optimizer,
            steps,
            key=key,
            record_every=record_every,
            # Without a bar, no host callbacks: they cost a little per block.
            progress=(
                progress.next_run(index * steps)
                if progress is not None and progress.enabled
                else None
            ),
        )
    )
  return results


def format_table(
    results: dict[tuple[str, str], problems.Trajectory],
    *,
    steps: int,
    seed: int,
    alpha: float,
    convention: str,
) -> str:
  lines = [
      "Adam vs AMSGrad on the synthetic problems of Reddi, Kale & Kumar "
      "(ICLR 2018), Section 5",
      "  online:     f_t(x) = 1010 x if t mod 101 == 1, else -10 x",
      f"  stochastic: f_t(x) = 1010 x with probability 0.01, else -10 x (seed {seed})",
      "  on F = [-1, 1], best fixed point x* = -1, start x_1 = 0, projection = clip",
      f"  b1 = {B1}, b2 = {B2}, eps = 1e-8, step size alpha_t = {alpha:g}/sqrt(t); "
      f"AMSGrad convention {convention!r}",
      f"  T = {steps:,} steps",
      "",
      f"{'problem':<12}{'optimizer':<11}{'x_T':>9}{'R_T/T':>11}",
  ]
  for (problem, name), result in results.items():
    lines.append(
        f"{problem:<12}{name:<11}{float(result.x[-1]):>+9.4f}"
        f"{float(result.average_regret[-1]):>11.4f}"
    )
  return "\n".join(lines)


def plot_figure1(
    results: dict[tuple[str, str], problems.Trajectory],
    path: Path,
    *,
    alpha: float,
) -> None:
  """The three panels of Figure 1: online R_t/t, online x_t, stochastic x_t."""
  from matplotlib.figure import Figure

  figure = Figure(figsize=(13.5, 3.9), layout="constrained")
  axes = figure.subplots(1, 3)
  colors = {"Adam": "tab:blue", "AMSGrad": "tab:red"}
  panels = [
      (axes[0], "online", "average_regret", r"$R_t / t$", "online: average regret"),
      (axes[1], "online", "x", r"$x_t$", r"online: iterate $x_t$"),
      (axes[2], "stochastic", "x", r"$x_t$", r"stochastic: iterate $x_t$"),
  ]
  for ax, problem, field, ylabel, title in panels:
    for name, color in colors.items():
      result = results[problem, name]
      ax.plot(result.t, getattr(result, field), color=color, lw=1.2, label=name)
    ax.set_title(title)
    ax.set_xlabel("iteration $t$")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    if field == "x":
      ax.set_ylim(-1.1, 1.1)
      ax.axhline(-1.0, color="gray", lw=0.8, ls=":")
    else:
      ax.set_ylim(bottom=0.0)
  axes[0].legend()
  figure.suptitle(
      rf"Adam vs AMSGrad, $\beta_1={B1}$, $\beta_2={B2}$, "
      rf"$\alpha_t={alpha:g}/\sqrt{{t}}$ (Reddi et al. 2018, Figure 1)"
  )
  figure.savefig(path, dpi=110)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
  if args.plot is not None:
    _check_plot_path(parser, args.plot)
  if args.progress == "auto":
    enabled, delay = sys.stderr.isatty(), PROGRESS_DELAY_S
  else:
    enabled, delay = args.progress == "always", 0.0
  bar = ProgressBar(4 * args.steps, stream=sys.stderr, enabled=enabled, delay_s=delay)
  try:
    results = run_all(args.steps, args.seed, args.alpha, args.convention, bar)
    # Host callbacks may still be in flight when the results are ready.
    jax.effects_barrier()  # type: ignore[no-untyped-call]
  finally:
    bar.close()
  print(
      format_table(
          results,
          steps=args.steps,
          seed=args.seed,
          alpha=args.alpha,
          convention=args.convention,
      )
  )
  if args.plot is not None:
    try:
      plot_figure1(results, args.plot, alpha=args.alpha)
    except OSError as error:
      print(f"error: could not write {str(args.plot)!r}: {error}", file=sys.stderr)
      return 1
    print(f"\nFigure written to {os.fspath(args.plot)}")
  return 0
