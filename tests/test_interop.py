"""Moving a running AMSGrad between PyTorch, Keras and JAX (optax_amsgrad.interop).

Each hand-over test runs a framework for K steps, moves the run, continues N
more steps on the other side and compares the params after each of those
steps with the run that never moved, in float64. The figures are printed
(``python -m pytest tests/test_interop.py -q -s -k handover``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad
from optax_amsgrad import interop

from trajectories import max_relative_difference

K, N = 15, 15  # steps before and after the hand-over
TOLERANCE = 1e-10
KERAS_LR = 2.0**-7  # exact in Keras' float32 learning-rate variable
# Framework layout: a Linear weight (out, in), its bias, and one more vector.
SHAPES = [(3, 4), (3,), (2,)]
NAMES = ["kernel", "bias", "scale"]


def gradients(steps: int, *, seed: int, dtype=np.float64) -> list[list[np.ndarray]]:
  """Gaussian gradients with frequent spikes, so that at the hand-over
  ``nu_max`` differs from ``nu`` (the test fails if the two are swapped)."""
  rng = np.random.default_rng(seed)
  sequence = []
  for _ in range(steps):
    step = []
    for shape in SHAPES:
      g = rng.normal(size=shape)
      step.append(np.where(rng.random(shape) < 0.1, 30 * g, g).astype(dtype))
    sequence.append(step)
  return sequence


def initial(*, seed: int, dtype=np.float64) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(dtype) for shape in SHAPES]


# --- The JAX side: the params as a pytree, in either layout -----------------


@dataclass(frozen=True)
class Layout:
  """How the framework's parameter list maps to a JAX pytree."""

  flax: bool  # a dict {"bias", "kernel" (in, out), "scale"} instead of a list

  def to_jax(self, arrays):
    if not self.flax:
      return [jnp.asarray(a) for a in arrays]
    return {"bias": jnp.asarray(arrays[1]), "kernel": jnp.asarray(arrays[0]).T,
            "scale": jnp.asarray(arrays[2])}

  def from_jax(self, tree):
    if not self.flax:
      return [np.asarray(a) for a in tree]
    return [np.asarray(tree["kernel"]).T, np.asarray(tree["bias"]), np.asarray(tree["scale"])]

  @property
  def options(self):
    if not self.flax:
      return {}
    # Leaves come as bias, kernel, scale: the framework's parameters 1, 0, 2.
    return {"order": [1, 0, 2], "layouts": {"bias": None, "kernel": (1, 0), "scale": None}}


PLAIN, FLAX = Layout(False), Layout(True)


def run_jax(solver, params, state, grads, layout: Layout):
  """``len(grads)`` jitted steps; the params after each, in framework layout."""

  @jax.jit
  def step(params, state, g):
    updates, state = solver.update(g, state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for g in grads:
    params, state = step(params, state, layout.to_jax(g))
    trajectory.append(layout.from_jax(params))
  return params, state, trajectory


def as_dicts(trajectory):
  return [{str(j): a for j, a in enumerate(step)} for step in trajectory]


def relative(actual, expected) -> float:
  return max_relative_difference(as_dicts(actual), as_dicts(expected))


# --- PyTorch ----------------------------------------------------------------


@dataclass(frozen=True)
class TorchCase:
  name: str
  make: Callable  # torch module, list of tensors -> optimizer
  ours: Callable[[], optax.GradientTransformation]  # for the framework's layout
  layout: Layout = PLAIN


def _partition(first, second, layout: Layout):
  labels = [0, 1, 1] if not layout.flax else {"bias": 1, "kernel": 0, "scale": 1}
  return interop.partition({0: first, 1: second}, labels)


TORCH_CASES = [
    TorchCase("adam", lambda torch, p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
              lambda: optax_amsgrad.amsgrad(1e-2)),
    TorchCase(
        "adamw",
        lambda torch, p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda: optax_amsgrad.amsgradw(1e-2, weight_decay=0.1),
    ),
    TorchCase(
        "adam_coupled_weight_decay",
        lambda torch, p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda: interop.coupled_weight_decay(0.1, optax_amsgrad.amsgrad(1e-2)),
    ),
    TorchCase(
        "adam_betas_eps",
        lambda torch, p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-6,
                                          amsgrad=True),
        lambda: optax_amsgrad.amsgrad(3e-3, b1=0.8, b2=0.99, eps=1e-6),
    ),
    TorchCase(
        "two_param_groups",
        lambda torch, p: torch.optim.Adam(
            [{"params": p[:1], "betas": (0.8, 0.99)},
             {"params": p[1:], "lr": 3e-3, "weight_decay": 0.05}],
            lr=1e-2, amsgrad=True,
        ),
        lambda: _partition(
            optax_amsgrad.amsgrad(1e-2, b1=0.8, b2=0.99),
            interop.coupled_weight_decay(0.05, optax_amsgrad.amsgrad(3e-3)),
            PLAIN,
        ),
    ),
    TorchCase(
        "adamw_linear_layout",
        lambda torch, p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda: optax_amsgrad.amsgradw(1e-2, weight_decay=0.1),
        FLAX,
    ),
]


class TorchRun:
  """A torch optimizer over float64 tensors, stepped with given gradients."""

  def __init__(self, torch, case: TorchCase, arrays):
    self.torch = torch
    self.tensors = [torch.tensor(np.array(a), requires_grad=True) for a in arrays]
    self.optimizer = case.make(torch, self.tensors)

  def run(self, grads):
    trajectory = []
    for g in grads:
      for tensor, grad in zip(self.tensors, g, strict=True):
        tensor.grad = self.torch.tensor(np.array(grad))
      self.optimizer.step()
      trajectory.append(self.params())
    return trajectory

  def params(self):
    return [t.detach().numpy().copy() for t in self.tensors]


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.mark.parity
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.name)
def test_handover_torch_to_jax(torch, case):
  grads, start = gradients(K + N, seed=1), initial(seed=2)
  expected = TorchRun(torch, case, start).run(grads)[K:]
  moving = TorchRun(torch, case, start)
  moving.run(grads[:K])
  params = case.layout.to_jax(moving.params())
  solver, state = optax_amsgrad.from_torch(
      moving.optimizer.state_dict(), params, **case.layout.options
  )
  _, _, actual = run_jax(solver, params, state, grads[K:], case.layout)
  difference = relative(actual, expected)
  print(f"\nhand-over torch {case.name} torch->jax: {difference:.1e}")
  assert difference <= TOLERANCE


@pytest.mark.parity
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.name)
def test_handover_jax_to_torch(torch, case):
  grads, start = gradients(K + N, seed=3), initial(seed=4)
  solver = case.ours()
  params = case.layout.to_jax(start)
  _, _, expected = run_jax(solver, params, solver.init(params), grads, case.layout)
  params, state, _ = run_jax(solver, params, solver.init(params), grads[:K], case.layout)
  moved = TorchRun(torch, case, case.layout.from_jax(params))
  moved.optimizer.load_state_dict(
      optax_amsgrad.to_torch(state, moved.optimizer, solver=solver, **case.layout.options)
  )
  actual = moved.run(grads[K:])
  difference = relative(actual, expected[K:])
  print(f"\nhand-over torch {case.name} jax->torch: {difference:.1e}")
  assert difference <= TOLERANCE


@pytest.mark.parity
def test_from_torch_state_is_the_optimizers_exactly_and_goes_back_unchanged(torch):
  case = TORCH_CASES[-1]  # AdamW, Linear layout
  run = TorchRun(torch, case, initial(seed=5))
  run.run(gradients(K, seed=6))
  state_dict = run.optimizer.state_dict()
  params = FLAX.to_jax(run.params())
  solver, state = optax_amsgrad.from_torch(state_dict, params, **FLAX.options)
  inner = state[0]
  assert int(inner.count) == K
  for ours, theirs in (("mu", "exp_avg"), ("nu", "exp_avg_sq"), ("nu_max", "max_exp_avg_sq")):
    tree = getattr(inner, ours)
    np.testing.assert_array_equal(tree["kernel"], state_dict["state"][0][theirs].numpy().T)
    np.testing.assert_array_equal(tree["bias"], state_dict["state"][1][theirs].numpy())
  # The spikes make the maximum differ from the average (nu and nu_max are told apart).
  assert np.any(np.asarray(inner.nu_max["kernel"]) > np.asarray(inner.nu["kernel"]))
  back = optax_amsgrad.to_torch(state, run.optimizer, solver=solver, **FLAX.options)
  assert back["param_groups"] == state_dict["param_groups"]
  for j, entry in state_dict["state"].items():
    for key, value in entry.items():
      assert back["state"][j][key].dtype == value.dtype
      assert torch.equal(back["state"][j][key], value), (j, key)


@pytest.mark.parity
def test_handover_before_the_first_step(torch):
  case = TORCH_CASES[0]
  grads, start = gradients(N, seed=7), initial(seed=8)
  expected = TorchRun(torch, case, start).run(grads)
  fresh = TorchRun(torch, case, start)
  params = PLAIN.to_jax(start)
  solver, state = optax_amsgrad.from_torch(fresh.optimizer.state_dict(), params)
  assert int(state[0].count) == 0
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(state[0]))
  _, _, actual = run_jax(solver, params, state, grads, PLAIN)
  assert relative(actual, expected) <= TOLERANCE
  # And back: a fresh state is an empty torch state.
  assert optax_amsgrad.to_torch(solver.init(params), fresh.optimizer,
                                solver=solver)["state"] == {}


@pytest.mark.parity
def test_state_dict_read_back_with_torch_load(torch, tmp_path):
  case = TORCH_CASES[1]
  run = TorchRun(torch, case, initial(seed=9))
  run.run(gradients(K, seed=10))
  torch.save(run.optimizer.state_dict(), tmp_path / "optimizer.pt")
  loaded = torch.load(tmp_path / "optimizer.pt")
  params = PLAIN.to_jax(run.params())
  _, state = optax_amsgrad.from_torch(loaded, params)
  _, direct = optax_amsgrad.from_torch(run.optimizer.state_dict(), params)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(direct), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parity
def test_float32_state(torch):
  case = TORCH_CASES[0]
  grads = gradients(K + N, seed=11, dtype=np.float32)
  start = initial(seed=12, dtype=np.float32)
  expected = TorchRun(torch, case, start).run(grads)[K:]
  moving = TorchRun(torch, case, start)
  moving.run(grads[:K])
  params = PLAIN.to_jax(moving.params())
  solver, state = optax_amsgrad.from_torch(moving.optimizer.state_dict(), params)
  assert {leaf.dtype for leaf in jax.tree.leaves((state[0].mu, state[0].nu_max))} == {
      jnp.dtype(jnp.float32)}
  np.testing.assert_array_equal(
      state[0].nu_max[0], moving.optimizer.state_dict()["state"][0]["max_exp_avg_sq"].numpy()
  )
  _, _, actual = run_jax(solver, params, state, grads[K:], PLAIN)
  assert relative(actual, expected) < 1e-5  # float32 round-off of two frameworks


# --- Narrow state, placement ------------------------------------------------


def _numpy_state_dict(step: int, moments, **group):
  """A torch Adam state dict written with NumPy arrays (what from_torch reads
  from torch tensors), one entry per parameter."""
  defaults = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
              "amsgrad": True, "maximize": False, "decoupled_weight_decay": False,
              "params": list(range(len(moments)))}
  state = {
      j: {"step": np.float32(step), "exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": v_max}
      for j, (m, v, v_max) in enumerate(moments)
  } if step else {}
  return {"state": state, "param_groups": [{**defaults, **group}]}


def _moments(seed: int, shape=(4096,), dtype=np.float32):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=shape).astype(dtype)
  v = rng.random(shape).astype(dtype)
  return m, v, (v * (1 + rng.random(shape))).astype(dtype)


@pytest.mark.parametrize("state_rounding", ["stochastic", "nearest"])
def test_bfloat16_state_is_rounded_as_the_solver_stores_it(state_rounding):
  m, v, v_max = _moments(13)
  params = [jnp.zeros(m.shape, jnp.float32)]
  _, state = optax_amsgrad.from_torch(
      _numpy_state_dict(7, [(m, v, v_max)]), params, mu_dtype=jnp.bfloat16,
      nu_dtype=jnp.bfloat16, state_rounding=state_rounding,
  )
  inner = state[0]
  assert {leaf.dtype for leaf in jax.tree.leaves((inner.mu, inner.nu, inner.nu_max))} == {
      jnp.dtype(jnp.bfloat16)}
  # nu_max is rounded to nearest, as the solver's steps store it, and kept at
  # or above the stored nu (which stochastic rounding may round up past it).
  nearest_v_max = np.asarray(jnp.asarray(v_max).astype(jnp.bfloat16), np.float32)
  np.testing.assert_array_equal(
      np.asarray(inner.nu_max[0], np.float32),
      np.maximum(nearest_v_max, np.asarray(inner.nu[0], np.float32)),
  )
  for stored, exact in ((inner.mu[0], m), (inner.nu[0], v)):
    stored = np.asarray(stored, np.float32)
    nearest = np.asarray(jnp.asarray(exact).astype(jnp.bfloat16), np.float32)
    if state_rounding == "nearest":
      np.testing.assert_array_equal(stored, nearest)
    else:
      # One of the two neighbours (bfloat16 spacing is at most 2**-7 relative),
      # unbiased on average, not always the nearest.
      assert np.all(np.abs(stored - exact) <= 2.0**-7 * np.abs(exact))
      assert np.mean(stored != nearest) > 0.05
      assert abs(np.mean(stored - exact)) < 3 * np.std(nearest - exact) / np.sqrt(exact.size)
  assert np.all(np.asarray(inner.nu_max[0], np.float32) >= np.asarray(inner.nu[0], np.float32))


@pytest.mark.parity
def test_bfloat16_state_goes_to_torch_widened(torch):
  m, v, v_max = _moments(15, shape=(16,))
  params = [jnp.zeros(16, jnp.float32)]
  solver, state = optax_amsgrad.from_torch(_numpy_state_dict(4, [(m, v, v_max)]), params,
                                           mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  optimizer = torch.optim.Adam([torch.zeros(16, requires_grad=True)], lr=1e-2, amsgrad=True)
  back = optax_amsgrad.to_torch(state, optimizer, solver=solver)["state"][0]
  assert float(back["step"]) == 4
  for key, ours in (("exp_avg", state[0].mu), ("max_exp_avg_sq", state[0].nu_max)):
    assert back[key].dtype == torch.float32
    np.testing.assert_array_equal(back[key].numpy(), np.asarray(ours[0], np.float32))
  optimizer.load_state_dict(optax_amsgrad.to_torch(state, optimizer, solver=solver))


def test_state_is_placed_as_init_places_it():
  m, v, v_max = _moments(14, shape=(8,))
  for params in ([np.zeros(8, np.float32)], [jnp.zeros(8, jnp.float32)],
                 [jax.device_put(jnp.zeros(8, jnp.float32), jax.devices()[0])]):
    solver, state = optax_amsgrad.from_torch(_numpy_state_dict(3, [(m, v, v_max)]), params)
    init = solver.init(params)
    for moved, made in zip(jax.tree.leaves(state), jax.tree.leaves(init), strict=True):
      assert moved.committed == made.committed
      assert moved.sharding == made.sharding


def test_sharded_params_give_sharded_state_and_one_compile():
  from scale_out.launch import script_env

  code = textwrap.dedent("""
      import json
      import jax, jax.numpy as jnp, numpy as np, optax
      from jax.sharding import NamedSharding, PartitionSpec as P
      import optax_amsgrad

      mesh = jax.make_mesh((4,), ("x",))
      sharding = NamedSharding(mesh, P("x"))
      params = {"w": jax.device_put(jnp.ones((8, 3)), sharding),
                "b": jax.device_put(jnp.ones(4), NamedSharding(mesh, P()))}
      rng = np.random.default_rng(0)
      moments = {k: [rng.random(np.shape(p)).astype(np.float32) for _ in range(3)]
                 for k, p in params.items()}
      state_dict = {
          "state": {j: {"step": np.float32(5), "exp_avg": m, "exp_avg_sq": v,
                        "max_exp_avg_sq": v + 1} for j, (m, v, _) in
                    enumerate(moments[k] for k in ("b", "w"))},
          "param_groups": [{"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8,
                            "weight_decay": 0.1, "amsgrad": True, "maximize": False,
                            "decoupled_weight_decay": True, "params": [0, 1]}],
      }
      solver, state = optax_amsgrad.from_torch(state_dict, params)
      init = solver.init(params)
      wrong = [str(path) for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state),
                                                  jax.tree.leaves(init))
               if a.sharding != b.sharding or a.committed != b.committed]
      w_sharding = state[0].nu_max["w"].sharding.is_equivalent_to(sharding, 2)

      @jax.jit
      def step(params, state):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = solver.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      step(params, init)
      step(params, state)
      print(json.dumps({"wrong": wrong, "w_is_params": w_sharding,
                        "compiles": step._cache_size()}))
  """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=script_env(host_devices=4), timeout=120)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {"wrong": [], "w_is_params": True, "compiles": 1}


# --- Keras ------------------------------------------------------------------


@dataclass(frozen=True)
class KerasCase:
  name: str
  options: dict
  ours: Callable[[], optax.GradientTransformation]


KERAS_CASES = [
    KerasCase("adam", {"learning_rate": KERAS_LR, "epsilon": 1e-7},
              lambda: optax_amsgrad.amsgrad(KERAS_LR, eps=1e-7, convention="keras")),
    KerasCase(
        "adamw", {"optimizer": "AdamW", "learning_rate": KERAS_LR, "epsilon": 1e-7,
                  "weight_decay": 0.125},
        lambda: optax_amsgrad.amsgradw(KERAS_LR, eps=1e-7, weight_decay=0.125,
                                       convention="keras"),
    ),
    KerasCase(
        "adamw_bias_excluded",
        {"optimizer": "AdamW", "learning_rate": KERAS_LR, "beta_1": 0.8, "beta_2": 0.99,
         "weight_decay": 0.125, "exclude": ["bias"]},
        lambda: optax_amsgrad.amsgradw(KERAS_LR, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.125,
                                       mask=[True, False, True], convention="keras"),
    ),
]


class KerasRun:
  def __init__(self, keras, case: KerasCase, arrays):
    options = dict(case.options)
    name = options.pop("optimizer", "Adam")
    exclude = options.pop("exclude", None)
    self.keras = keras
    self.variables = [keras.Variable(np.array(a), dtype="float64", name=n)
                      for a, n in zip(arrays, NAMES, strict=True)]
    self.optimizer = getattr(keras.optimizers, name)(amsgrad=True, **options)
    if exclude:
      self.optimizer.exclude_from_weight_decay(var_names=exclude)
    self.optimizer.build(self.variables)

  def run(self, grads):
    trajectory = []
    for g in grads:
      self.optimizer.apply_gradients(
          [(self.keras.ops.convert_to_tensor(grad, dtype="float64"), v)
           for grad, v in zip(g, self.variables, strict=True)]
      )
      trajectory.append(self.params())
    return trajectory

  def params(self):
    return [np.array(self.keras.ops.convert_to_numpy(v)) for v in self.variables]


@pytest.fixture(scope="module")
def keras():
  return pytest.importorskip("keras")


@pytest.mark.parity
def test_unbuilt_keras_optimizer_has_taken_no_step(keras):
  optimizer = keras.optimizers.AdamW(KERAS_LR, weight_decay=0.125, amsgrad=True)
  params = PLAIN.to_jax(initial(seed=20))
  solver, state = optax_amsgrad.from_keras(optimizer, params)
  assert int(state[0].count) == 0
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(state))
  expected = optax_amsgrad.amsgradw(KERAS_LR, eps=1e-7, weight_decay=0.125, convention="keras")
  grads = PLAIN.to_jax(gradients(1, seed=25)[0])
  np.testing.assert_array_equal(*(
      jax.tree.leaves(s.update(grads, s.init(params), params)[0])[0] for s in (solver, expected)
  ))


@pytest.mark.parity
@pytest.mark.parametrize("case", KERAS_CASES, ids=lambda c: c.name)
def test_handover_keras_to_jax(keras, case):
  grads, start = gradients(K + N, seed=21), initial(seed=22)
  expected = KerasRun(keras, case, start).run(grads)[K:]
  moving = KerasRun(keras, case, start)
  moving.run(grads[:K])
  params = PLAIN.to_jax(moving.params())
  solver, state = optax_amsgrad.from_keras(moving.optimizer, params)
  _, _, actual = run_jax(solver, params, state, grads[K:], PLAIN)
  difference = relative(actual, expected)
  print(f"\nhand-over keras {case.name} keras->jax: {difference:.1e}")
  assert difference <= TOLERANCE


@pytest.mark.parity
@pytest.mark.parametrize("case", KERAS_CASES, ids=lambda c: c.name)
def test_handover_jax_to_keras(keras, case):
  grads, start = gradients(K + N, seed=23), initial(seed=24)
  solver = case.ours()
  params = PLAIN.to_jax(start)
  _, _, expected = run_jax(solver, params, solver.init(params), grads, PLAIN)
  params, state, _ = run_jax(solver, params, solver.init(params), grads[:K], PLAIN)
  moved = KerasRun(keras, case, PLAIN.from_jax(params))
  optax_amsgrad.to_keras(state, moved.optimizer, solver=solver)
  actual = moved.run(grads[K:])
  difference = relative(actual, expected[K:])
  print(f"\nhand-over keras {case.name} jax->keras: {difference:.1e}")
  assert difference <= TOLERANCE


# --- Optax ------------------------------------------------------------------


def test_optax_amsgrad_state_continues_under_the_optax_convention():
  grads, start = gradients(K + N, seed=31), initial(seed=32)
  theirs = optax.amsgrad(1e-2)
  params = PLAIN.to_jax(start)
  _, _, expected = run_jax(theirs, params, theirs.init(params), grads, PLAIN)
  params, state, _ = run_jax(theirs, params, theirs.init(params), grads[:K], PLAIN)
  ours = optax_amsgrad.amsgrad(1e-2, convention="optax")
  moved = optax_amsgrad.from_optax(state, theirs, solver=ours)
  for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(state), strict=True):
    assert a is b  # the values as they are
  params_after, state_after, actual = run_jax(ours, params, moved, grads[K:], PLAIN)
  assert relative(actual, expected[K:]) <= TOLERANCE
  # And back.
  _, _, back = run_jax(theirs, params_after, optax_amsgrad.to_optax(state_after),
                       grads[:K], PLAIN)
  _, _, reference = run_jax(ours, params_after, state_after, grads[:K], PLAIN)
  assert relative(back, reference) <= TOLERANCE


# --- Bad input --------------------------------------------------------------


def _params(n=1, shape=(4096,)):
  return [jnp.zeros(shape, jnp.float32) for _ in range(n)]


def test_not_an_adam_state_dict():
  with pytest.raises(TypeError, match="a mapping with 'state' and 'param_groups'"):
    optax_amsgrad.from_torch({"model": {}}, _params())
  sgd = {"state": {0: {"momentum_buffer": np.zeros(4096)}},
         "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}
  with pytest.raises(ValueError, match=r"Param group 0 has no betas, eps, weight_decay, "
                                       r"amsgrad .*not the state dict of torch.optim.Adam"):
    optax_amsgrad.from_torch(sgd, _params())


def test_non_amsgrad_state_dicts():
  m, v, v_max = _moments(40)
  plain = _numpy_state_dict(3, [(m, v, v_max)], amsgrad=False)
  del plain["state"][0]["max_exp_avg_sq"]
  with pytest.raises(ValueError, match="amsgrad=False: the state dict is plain Adam's"):
    optax_amsgrad.from_torch(plain, _params())
  plain["param_groups"][0]["amsgrad"] = True
  with pytest.raises(ValueError, match=r"state of parameter 0 has no max_exp_avg_sq .*not the "
                                       r"state of an AMSGrad optimizer"):
    optax_amsgrad.from_torch(plain, _params())


def test_parameter_count_and_shape_mismatches():
  m, v, v_max = _moments(41, shape=(3, 4))
  state_dict = _numpy_state_dict(3, [(m, v, v_max)] * 2)
  with pytest.raises(ValueError, match="has 2 parameters but params has 1 leaves"):
    optax_amsgrad.from_torch(state_dict, _params(1, (3, 4)))
  params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((4, 3))}
  with pytest.raises(ValueError, match=r"Parameter 1 of the torch optimizer's state dict has "
                                       r"shape \(3, 4\), but params leaf 1 \(\['b'\]\) has "
                                       r"shape \(4, 3\)"):
    optax_amsgrad.from_torch(state_dict, params)
  with pytest.raises(ValueError, match=r"shape \(3, 4\) \(\(4, 3\) after layout \(1, 0\)\), "
                                       r"but params leaf 0 \(\['a'\]\) has shape \(3, 4\)"):
    optax_amsgrad.from_torch(state_dict, params, layouts={"a": (1, 0), "b": (1, 0)})
  with pytest.raises(ValueError, match=r"layouts for params leaf 0 .* must be None or a "
                                       r"permutation of range\(2\); got \(0,\)"):
    optax_amsgrad.from_torch(state_dict, params, layouts={"a": (0,), "b": None})
  with pytest.raises(ValueError, match=r"order must be a permutation of range\(2\)"):
    optax_amsgrad.from_torch(state_dict, params, order=[0, 0])


def test_mixed_steps():
  m, v, v_max = _moments(42)
  state_dict = _numpy_state_dict(3, [(m, v, v_max)] * 2)
  state_dict["state"][1]["step"] = np.float32(2)
  with pytest.raises(ValueError, match="Mixed steps: parameter 0 has step 3; parameter 1 has "
                                       "step 2"):
    optax_amsgrad.from_torch(state_dict, _params(2))
  del state_dict["state"][1]
  with pytest.raises(ValueError, match=r"Mixed steps: parameter 0 has step 3; parameters \[1\] "
                                       "have not been stepped"):
    optax_amsgrad.from_torch(state_dict, _params(2))


def test_unsupported_options():
  m, v, v_max = _moments(43)
  with pytest.raises(NotImplementedError, match="maximize=True, which is not supported"):
    optax_amsgrad.from_torch(_numpy_state_dict(3, [(m, v, v_max)], maximize=True), _params())
  complex_moments = (m.astype(np.complex64), v.astype(np.complex64), v_max.astype(np.complex64))
  with pytest.raises(NotImplementedError, match=r"Parameter 0 .* is complex but params leaf 0 "
                                                r"\(\[0\]\) is real"):
    optax_amsgrad.from_torch(_numpy_state_dict(3, [complex_moments]), _params())
  with pytest.raises(ValueError, match="initial_lr: an LR scheduler drives this optimizer"):
    optax_amsgrad.from_torch(_numpy_state_dict(3, [(m, v, v_max)], initial_lr=1e-2), _params())
  unknown = _numpy_state_dict(3, [(m, v, v_max)], weight_decay=0.1)
  del unknown["param_groups"][0]["decoupled_weight_decay"]
  with pytest.raises(ValueError, match="pass decoupled_weight_decay=True for AdamW"):
    optax_amsgrad.from_torch(unknown, _params())
  solver, _ = optax_amsgrad.from_torch(unknown, _params(), decoupled_weight_decay=True)
  assert len(solver.init(_params())) == 3  # amsgradw's chain


def test_learning_rate_override_continues_a_schedule():
  m, v, v_max = _moments(44, shape=(2,))
  schedule = optax.linear_schedule(1e-2, 0.0, 100)
  solver, state = optax_amsgrad.from_torch(
      _numpy_state_dict(40, [(m, v, v_max)], initial_lr=1e-2), _params(1, (2,)),
      learning_rate=schedule,
  )
  assert int(state[1].count) == 40  # the schedule continues at step 40
  updates, _ = solver.update([jnp.ones(2)], state)
  core, _ = optax_amsgrad.scale_by_amsgrad().update([jnp.ones(2)], state[0])
  np.testing.assert_allclose(updates[0], -schedule(40) * core[0], rtol=1e-6)


@pytest.mark.parity
def test_to_torch_bad_input(torch):
  weights = [torch.zeros(3, requires_grad=True)]
  params = [jnp.zeros(3)]
  solver = optax_amsgrad.amsgrad(1e-2)
  state = solver.init(params)
  with pytest.raises(TypeError, match=r"must be a torch.optim.Adam or AdamW .*got SGD"):
    optax_amsgrad.to_torch(state, torch.optim.SGD(weights, lr=0.1), solver=solver)
  with pytest.raises(ValueError, match="amsgrad=False"):
    optax_amsgrad.to_torch(state, torch.optim.Adam(weights), solver=solver)
  amsgrad = torch.optim.Adam(weights, amsgrad=True)
  with pytest.raises(TypeError, match=r"optax.amsgrad's state, whose nu_max is bias-corrected"):
    optax_amsgrad.to_torch(optax.amsgrad(1e-2).init(params), amsgrad, solver=solver)
  with pytest.raises(ValueError, match=r"Parameter 0 of the torch optimizer has shape \(3,\), "
                                       r"but params leaf 0 \(\[0\]\) has shape \(4,\)"):
    optax_amsgrad.to_torch(solver.init([jnp.zeros(4)]), amsgrad, solver=solver)
  split = optax.partition({0: optax_amsgrad.amsgrad(1e-2), 1: optax_amsgrad.amsgrad(1e-3)},
                          [0, 1])
  split_state = split.init([jnp.zeros(3), jnp.zeros(3)])
  _, split_state = split.update([jnp.ones(3), jnp.ones(3)], split_state)
  inner = split_state.inner_states[1].inner_state
  split_state.inner_states[1] = split_state.inner_states[1]._replace(
      inner_state=(inner[0]._replace(count=jnp.asarray(7, jnp.int32)), inner[1]))
  two = torch.optim.Adam([torch.zeros(3), torch.zeros(3)], amsgrad=True)
  with pytest.raises(ValueError, match=r"Mixed steps: .* step counts \[1, 7\]"):
    optax_amsgrad.to_torch(split_state, two, solver=split)
  complex_weights = [torch.zeros(3, dtype=torch.complex64, requires_grad=True)]
  keras_state = optax_amsgrad.amsgrad(1e-2, convention="keras").init([jnp.zeros(3, jnp.complex64)])
  with pytest.raises(NotImplementedError, match="is complex and its nu is real"):
    optax_amsgrad.to_torch(keras_state, torch.optim.Adam(complex_weights, amsgrad=True),
                           solver=solver)
  with pytest.raises(NotImplementedError, match="maximize=True"):
    optax_amsgrad.to_torch(state, torch.optim.Adam(weights, amsgrad=True, maximize=True),
                           solver=solver)


@pytest.mark.parity
def test_keras_bad_input(keras):
  variables = [keras.Variable(np.zeros(3), dtype="float64")]
  params = [jnp.zeros(3)]
  with pytest.raises(TypeError, match=r"must be a keras.optimizers.Adam or AdamW .*got SGD"):
    optax_amsgrad.from_keras(keras.optimizers.SGD(), params)
  with pytest.raises(ValueError, match="amsgrad=False"):
    optax_amsgrad.from_keras(keras.optimizers.Adam(), params)
  with pytest.raises(NotImplementedError, match=r"global_clipnorm=1.0, which is not supported"):
    optax_amsgrad.from_keras(keras.optimizers.Adam(amsgrad=True, global_clipnorm=1.0), params)
  schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.9)
  with pytest.raises(ValueError, match="a schedule, which does not travel"):
    optax_amsgrad.from_keras(keras.optimizers.Adam(schedule, amsgrad=True), params)
  built = keras.optimizers.Adam(amsgrad=True)
  built.build(variables)
  with pytest.raises(ValueError, match="Keras optimizer has 1 parameters but params has 2"):
    optax_amsgrad.from_keras(built, params * 2)
  with pytest.raises(ValueError, match="keras_optimizer is not built"):
    optax_amsgrad.to_keras(optax_amsgrad.amsgrad(1e-2).init(params),
                           keras.optimizers.Adam(amsgrad=True), solver=optax_amsgrad.amsgrad(1e-2))
  with pytest.raises(ValueError, match=r"Parameter 0 of the Keras optimizer has shape \(3,\), "
                                       r"but params leaf 0 \(\[0\]\) has shape \(2,\)"):
    optax_amsgrad.to_keras(optax_amsgrad.amsgrad(1e-2).init([jnp.zeros(2)]), built,
                           solver=optax_amsgrad.amsgrad(1e-2))
