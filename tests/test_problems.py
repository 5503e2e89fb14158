"""The synthetic problems of Reddi et al. (2018): checked against a float64
NumPy loop (tests/reference.py for AMSGrad, Adam's formula written out here)
and against what the paper proves about where Adam and AMSGrad end up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad
from optax_amsgrad import problems

from reference import ReferenceAmsgrad

B1, B2, EPS = 0.9, 0.99, 1e-8


def float64_schedule(alpha):
  return lambda count: alpha / jnp.sqrt(count + 1.0)


class ReferenceAdam:
  """optax.adam's formula in float64: bias-corrected m and v, eps outside."""

  def __init__(self, b1, b2, eps):
    self.b1, self.b2, self.eps = b1, b2, eps
    self.m = self.v = 0.0
    self.t = 0

  def step(self, g):
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    m_hat = self.m / (1 - self.b1**self.t)
    v_hat = self.v / (1 - self.b2**self.t)
    return m_hat / (np.sqrt(v_hat) + self.eps)


def reference_run(gradients, stepper, alpha, x0=0.0, lower=-1.0, upper=1.0):
  """x_t (played at step t), R_t / t against x* = lower, and x_{T+1}."""
  x = x0
  xs, average_regret = [], []
  regret = 0.0
  for t, g in enumerate(gradients, start=1):
    xs.append(x)
    regret += g * (x - lower)
    average_regret.append(regret / t)
    x = float(np.clip(x - alpha / np.sqrt(t) * stepper.step(g), lower, upper))
  return np.array(xs), np.array(average_regret), x


def all_gradients(problem, num_steps, key=None):
  key = jax.random.key(0) if key is None else key
  t = jnp.arange(1, num_steps + 1)
  return np.asarray(jax.vmap(problem.gradient, (0, None))(t, key), np.float64)


# --- The gradient sequences -------------------------------------------------


def test_online_gradients_follow_the_paper():
  t = np.arange(1, 1000)
  expected = np.where(t % 101 == 1, 1010.0, -10.0)
  np.testing.assert_array_equal(all_gradients(problems.online(), 999), expected)


def test_theorem1_gradients_follow_the_paper():
  t = np.arange(1, 100)
  expected = np.where(t % 3 == 1, 5.0, -1.0)
  np.testing.assert_array_equal(all_gradients(problems.theorem1(5.0), 99), expected)
  assert problems.theorem1_betas(5.0) == (0.0, 1.0 / 26.0)


def test_stochastic_gradients_are_bernoulli_and_seeded():
  n = 200_000
  g = all_gradients(problems.stochastic(), n, jax.random.key(3))
  assert set(np.unique(g)) == {-10.0, 1010.0}
  count = int(np.sum(g == 1010.0))
  # Binomial(n, 0.01): mean 2000, standard deviation ~44.5; 6 sigma.
  assert abs(count - 2000) < 6 * np.sqrt(n * 0.01 * 0.99)
  again = all_gradients(problems.stochastic(), n, jax.random.key(3))
  other = all_gradients(problems.stochastic(), n, jax.random.key(4))
  np.testing.assert_array_equal(g, again)
  assert np.any(g != other)


@pytest.mark.parametrize(
    ("problem", "mean"),
    [
        (problems.online(), 10.0 / 101.0),
        (problems.stochastic(), 0.01 * 1010 - 0.99 * 10),
        (problems.theorem1(3.0), 1.0 / 3.0),
    ],
)
def test_the_best_fixed_point_is_minus_one(problem, mean):
  assert problem.mean_gradient == pytest.approx(mean)
  assert problem.optimum == -1.0


def test_inverse_sqrt_schedule():
  schedule = problems.inverse_sqrt_schedule(0.5)
  counts = np.arange(0, 10_000, 37)
  np.testing.assert_allclose(
      [float(schedule(jnp.int32(c))) for c in counts[:5]],
      0.5 / np.sqrt(counts[:5] + 1.0),
      rtol=1e-15,
  )
  # The dtype follows the updates it multiplies.
  assert (schedule(jnp.int32(3)) * jnp.ones([], jnp.float32)).dtype == jnp.float32


# --- Runs against the float64 NumPy loop -----------------------------------


@pytest.mark.parametrize("convention", ["pytorch", "keras", "optax", "paper"])
@pytest.mark.parametrize("name", ["online", "stochastic", "theorem1"])
def test_amsgrad_run_matches_reference(name, convention):
  problem = getattr(problems, name)()
  num_steps, alpha = 700, 0.3
  b1, b2 = problems.theorem1_betas() if name == "theorem1" else (B1, B2)
  key = jax.random.key(11)
  optimizer = optax_amsgrad.amsgrad(
      float64_schedule(alpha), b1=b1, b2=b2, eps=EPS, convention=convention
  )
  result = problems.run(problem, optimizer, num_steps, key=key, dtype=jnp.float64)
  stepper = ReferenceAmsgrad((), b1=b1, b2=b2, eps=EPS, convention=convention)
  xs, average_regret, final = reference_run(
      all_gradients(problem, num_steps, key), stepper, alpha
  )
  np.testing.assert_array_equal(result.t, np.arange(1, num_steps + 1))
  np.testing.assert_allclose(result.x, xs, rtol=0, atol=1e-12)
  np.testing.assert_allclose(result.average_regret, average_regret, rtol=1e-12, atol=1e-12)
  assert float(result.final_x) == pytest.approx(final, abs=1e-12)


@pytest.mark.parametrize("name", ["online", "stochastic", "theorem1"])
def test_adam_run_matches_reference(name):
  problem = getattr(problems, name)()
  num_steps, alpha = 700, 0.3
  b1, b2 = problems.theorem1_betas() if name == "theorem1" else (B1, B2)
  key = jax.random.key(5)
  optimizer = optax.adam(float64_schedule(alpha), b1=b1, b2=b2, eps=EPS)
  result = problems.run(problem, optimizer, num_steps, key=key, dtype=jnp.float64)
  xs, average_regret, _ = reference_run(
      all_gradients(problem, num_steps, key), ReferenceAdam(b1, b2, EPS), alpha
  )
  np.testing.assert_allclose(result.x, xs, rtol=0, atol=1e-12)
  np.testing.assert_allclose(result.average_regret, average_regret, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("record_every", [1, 7, 100, 1000])
def test_recording_every_k_steps_picks_the_same_points(record_every):
  num_steps, alpha = 700, 0.3
  problem = problems.stochastic()
  key = jax.random.key(2)
  optimizer = optax_amsgrad.amsgrad(float64_schedule(alpha), b1=B1, b2=B2)
  result = problems.run(
      problem, optimizer, num_steps, key=key, record_every=record_every,
      dtype=jnp.float64,
  )
  xs, average_regret, final = reference_run(
      all_gradients(problem, num_steps, key),
      ReferenceAmsgrad((), b1=B1, b2=B2, eps=EPS),
      alpha,
  )
  expected_t = list(range(record_every, num_steps + 1, record_every))
  if num_steps % record_every:
    expected_t.append(num_steps)
  np.testing.assert_array_equal(result.t, expected_t)
  index = np.array(expected_t) - 1
  np.testing.assert_allclose(result.x, xs[index], rtol=0, atol=1e-12)
  np.testing.assert_allclose(result.average_regret, average_regret[index], rtol=1e-12)
  assert float(result.final_x) == pytest.approx(final, abs=1e-12)


def test_float32_regret_is_summed_without_drift():
  # 300,000 float32 additions of terms up to ~2000 would lose the small
  # average regret to round-off; the run compensates (Kahan summation).
  num_steps = 300_000
  problem = problems.online()
  optimizer = optax_amsgrad.amsgrad(problems.inverse_sqrt_schedule(1.0), b1=B1, b2=B2)
  result = problems.run(problem, optimizer, num_steps)
  assert result.x.dtype == jnp.float32
  x = np.asarray(result.x, np.float64)
  g = all_gradients(problem, num_steps)
  expected = np.cumsum(g * (x + 1.0)) / np.arange(1, num_steps + 1)
  np.testing.assert_allclose(result.average_regret, expected, rtol=2e-6, atol=1e-7)


def test_trace_records_the_optimizer_state():
  num_steps, alpha = 300, 0.3
  problem = problems.online()
  optimizer = optax_amsgrad.amsgrad(float64_schedule(alpha), b1=B1, b2=B2)
  result = problems.run(
      problem, optimizer, num_steps, dtype=jnp.float64,
      trace=lambda state: (optax.tree.get(state, "nu"), optax.tree.get(state, "nu_max")),
  )
  stepper = ReferenceAmsgrad((), b1=B1, b2=B2, eps=EPS)
  nu, nu_max = [], []
  for g in all_gradients(problem, num_steps):
    stepper.step(g)
    nu.append(float(stepper.v))
    nu_max.append(float(stepper.v_max))
  np.testing.assert_allclose(result.trace[0], nu, rtol=1e-13)
  np.testing.assert_allclose(result.trace[1], nu_max, rtol=1e-13)


def test_progress_callback_counts_the_steps():
  seen = []
  problems.run(
      problems.online(), optax.sgd(0.01), 1050, record_every=100,
      progress=lambda done: seen.append(int(done)),
  )
  jax.effects_barrier()
  assert sorted(seen) == [*range(100, 1001, 100), 1050]


def test_run_composes_with_jit_and_vmap():
  problem = problems.stochastic()
  optimizer = optax_amsgrad.amsgrad(problems.inverse_sqrt_schedule(0.5), b1=B1, b2=B2)
  keys = jax.random.split(jax.random.key(0), 3)
  batched = jax.jit(
      jax.vmap(lambda k: problems.run(problem, optimizer, 500, key=k, record_every=50))
  )(keys)
  assert batched.x.shape == (3, 10)
  for i in range(3):
    single = problems.run(problem, optimizer, 500, key=keys[i], record_every=50)
    np.testing.assert_allclose(batched.x[i], single.x, rtol=1e-6, atol=1e-6)


def test_any_optax_optimizer_with_params_works():
  # amsgradw needs the params in update; plain SGD on theorem1 is exact.
  result = problems.run(
      problems.theorem1(), optax_amsgrad.amsgradw(0.01, weight_decay=0.1), 30
  )
  assert np.all(np.abs(result.x) <= 1.0)
  sgd = problems.run(problems.theorem1(3.0), optax.sgd(0.1), 6, dtype=jnp.float64)
  np.testing.assert_allclose(sgd.x, [0.0, -0.3, -0.2, -0.1, -0.4, -0.3], atol=1e-15)


def test_projection_keeps_iterates_in_the_box():
  result = problems.run(problems.online(), optax.sgd(1.0), 500, x0=1.0)
  assert float(result.x.min()) == -1.0 and float(result.x.max()) == 1.0


# --- Where Adam and AMSGrad end up (Section 5, Figure 1; Theorem 1) --------


def demo_optimizers(alpha=1.0):
  schedule = problems.inverse_sqrt_schedule(alpha)
  return optax.adam(schedule, b1=B1, b2=B2), optax_amsgrad.amsgrad(schedule, b1=B1, b2=B2)


def test_online_adam_goes_to_plus_one_and_amsgrad_to_minus_one():
  adam, ams = demo_optimizers()
  num_steps = 1_000_000
  adam_run = problems.run(problems.online(), adam, num_steps, record_every=10_000)
  ams_run = problems.run(problems.online(), ams, num_steps, record_every=10_000)
  assert float(adam_run.x[-1]) > 0.99
  assert float(ams_run.x[-1]) < -0.99
  # Over its last half, Adam sits at the worst point: its average regret stays
  # high; AMSGrad's goes to 0 (the paper's left panel).
  assert float(adam_run.average_regret[-1]) > 0.15
  assert float(ams_run.average_regret[-1]) < 0.1
  assert float(ams_run.average_regret[-1]) < 0.5 * float(ams_run.average_regret[9])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stochastic_adam_goes_to_plus_one_and_amsgrad_to_minus_one(seed):
  adam, ams = demo_optimizers()
  num_steps = 1_000_000
  key = jax.random.key(seed)
  adam_run = problems.run(problems.stochastic(), adam, num_steps, key=key,
                          record_every=10_000)
  ams_run = problems.run(problems.stochastic(), ams, num_steps, key=key,
                         record_every=10_000)
  # The noise moves the iterates a little; judge the last tenth of the run.
  assert float(np.mean(adam_run.x[-10:])) > 0.9
  assert float(np.mean(ams_run.x[-10:])) < -0.8


@pytest.mark.parametrize("c", [3.0, 10.0])
def test_theorem1_adam_fails_and_amsgrad_does_not(c):
  b1, b2 = problems.theorem1_betas(c)
  schedule = problems.inverse_sqrt_schedule(0.5)
  num_steps = 300_000
  adam = problems.run(problems.theorem1(c), optax.adam(schedule, b1=b1, b2=b2),
                      num_steps, record_every=3_000)
  ams = problems.run(problems.theorem1(c),
                     optax_amsgrad.amsgrad(schedule, b1=b1, b2=b2),
                     num_steps, record_every=3_000)
  assert float(adam.final_x) > 0.99
  assert float(ams.final_x) < -0.99
  # At x = +1 each period of 3 steps loses (C - 2) * 2 against x* = -1.
  assert float(adam.average_regret[-1]) == pytest.approx(2 * (c - 2) / 3, rel=0.01)
  assert float(ams.average_regret[-1]) < 0.01


# --- Bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: problems.theorem1(2.0), "C > 2"),
        (lambda: problems.theorem1(float("nan")), "C > 2"),
        (lambda: problems.stochastic(probability=0.0), "probability"),
        (lambda: problems.stochastic(probability=1.5), "probability"),
        (lambda: problems.online(period=1), "period"),
        (lambda: problems.online(large=float("inf")), "large"),
        (lambda: problems.LinearProblem("x", 1.0, -1.0), "exactly one"),
        (lambda: problems.LinearProblem("x", 1.0, -1.0, period=3, lower=1.0), "lower"),
        (lambda: problems.inverse_sqrt_schedule(0.0), "alpha"),
    ],
)
def test_bad_problems_are_refused(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": 10.0}, TypeError, "num_steps"),
        ({"record_every": 0}, ValueError, "record_every"),
        ({"x0": 2.0}, ValueError, "x0"),
        ({"problem": problems.stochastic()}, ValueError, "key"),
        ({"problem": "online"}, TypeError, "LinearProblem"),
        ({"optimizer": optax.sgd}, TypeError, "GradientTransformation"),
    ],
)
def test_bad_runs_are_refused(kwargs, error, message):
  arguments = {
      "problem": problems.online(),
      "optimizer": optax.sgd(0.1),
      "num_steps": 10,
  }
  arguments.update(kwargs)
  positional = [arguments.pop(k) for k in ("problem", "optimizer", "num_steps")]
  with pytest.raises(error, match=message):
    problems.run(*positional, **arguments)
