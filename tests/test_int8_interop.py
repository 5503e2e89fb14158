"""Interop with 8-bit state (``mu_dtype="int8"``, ``nu_dtype="int8"``).

A run moved in from PyTorch or Keras is quantized with the format's own
encoder (``nu_max`` rounded up); a run moved out is written as
``decode_state`` reads it. The hand-over error is bounded by the code's
resolution, derived here from the format alone: in a block whose largest
value is ``B``, the scale ``2**s`` has ``2**s <= 2 B``; a value ``x`` in one
of the code's normal binades (``|x| >= 2**(s - top + 1)``) is held to one
step, ``2**(floor(log2 |x|) - M) <= 2**-M |x|``, and one below them to the
lowest binade's step ``2**(s - top + 1 - M) <= B 2**(2 - top - M)``; no scale
is below ``2**MIN_EXPONENT``. ``M`` is the code's mantissa bits (3 for ``mu``,
4 for ``nu``), ``top = 2**E - 1`` its top exponent field (15).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_amsgrad
from optax_amsgrad import _blockwise

SHAPES = [(8, 600), (5,)]  # the first in 8-bit blocks (with a partial block), the second too small
LR = 2.0**-7  # exact in float32, as Keras holds it
STEPS = 4


def blocks_max(x: np.ndarray) -> np.ndarray:
  """Each element's block maximum of ``|x|`` (blocks of BLOCK along the last axis)."""
  n = x.shape[-1]
  blocks = -(-n // _blockwise.BLOCK)
  padded = np.zeros((*x.shape[:-1], blocks * _blockwise.BLOCK))
  padded[..., :n] = np.abs(x)
  per_block = padded.reshape(*x.shape[:-1], blocks, _blockwise.BLOCK).max(axis=-1)
  return np.repeat(per_block, _blockwise.BLOCK, axis=-1)[..., :n]


def resolution(x: np.ndarray, buffer: str) -> np.ndarray:
  """The step of the code at each element of ``x`` (float64), bounded from
  the format alone (see the module's docstring)."""
  code = _blockwise.CODES[buffer]
  x = np.asarray(x, np.float64)
  m = code.mantissa_bits
  relative = np.abs(x) * 2.0**-m
  lowest = blocks_max(x) * 2.0 ** (2 - code.top - m)
  floor = 2.0 ** (_blockwise.MIN_EXPONENT - code.top + 1 - m)
  return np.maximum(np.maximum(relative, lowest), floor)


def gradients(seed: int) -> list[list[np.ndarray]]:
  """Gradients whose scale varies by six decades inside a block, with zeros
  and spikes: the second moments span twelve."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(STEPS):
    step = []
    for shape in SHAPES:
      g = rng.normal(size=shape) * 10.0 ** rng.uniform(-4, 2, size=shape)
      g = np.where(rng.random(shape) < 0.05, 0.0, g)
      step.append(g.astype(np.float32))
    out.append(step)
  # The last step is smaller, so that max_exp_avg_sq differs from exp_avg_sq.
  out[-1] = [g * np.float32(0.01) for g in out[-1]]
  return out


def initial(seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]


def params_of(arrays) -> dict[str, jax.Array]:
  return {"a": jnp.asarray(arrays[0], jnp.float32), "b": jnp.asarray(arrays[1], jnp.float32)}


def check_handed_in(state, framework: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
  """``state`` (one AMSGrad state over ``params_of``) against the framework's
  moments ``(mu, nu, nu_max)`` per parameter: 8-bit blocks where the leaf is
  large enough, within one step of the code; ``nu_max`` (rounded to nearest,
  as the step stores it) never below the stored ``nu``, and never 0 where the
  framework's is positive; the small leaf as it is."""
  inner = state[0]
  assert _blockwise.is_quantized(inner.mu["a"]) and _blockwise.is_quantized(inner.nu["a"])
  assert _blockwise.is_quantized(inner.nu_max["a"])
  decoded = optax_amsgrad.decode_state(state)[0]
  for field, buffer, k in (("mu", "mu", 0), ("nu", "nu", 1), ("nu_max", "nu", 2)):
    expected = np.asarray(framework[0][k], np.float64)
    got = np.asarray(decoded._asdict()[field]["a"], np.float64)
    if field == "nu_max":
      # Rounded from the maximum of the framework's and the stored nu.
      expected = np.maximum(expected, np.asarray(decoded.nu["a"], np.float64))
    error = np.abs(got - expected)
    worst = float((error / resolution(expected, buffer)).max())
    assert worst < 1.0, (field, worst)
    # The data reach the code's resolution: the bound is not vacuous.
    assert worst > 0.25, (field, worst)
    np.testing.assert_array_equal(np.asarray(decoded._asdict()[field]["b"]), framework[1][k])
  nu_max = np.asarray(decoded.nu_max["a"])
  assert (nu_max >= np.asarray(decoded.nu["a"])).all()
  assert (nu_max[framework[0][2] > 0] > 0).all()


# --- PyTorch ----------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def torch_run(torch, arrays, grads):
  tensors = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
  optimizer = torch.optim.Adam(tensors, lr=LR, amsgrad=True)
  for step in grads:
    for p, g in zip(tensors, step, strict=True):
      p.grad = torch.from_numpy(g.copy())
    optimizer.step()
  return tensors, optimizer


def torch_moments(optimizer) -> list[tuple[np.ndarray, ...]]:
  state = optimizer.state_dict()["state"]
  return [tuple(state[i][k].numpy().copy() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
          for i in range(len(SHAPES))]


@pytest.mark.parametrize("state_rounding", ["stochastic", "nearest"])
def test_from_torch_quantizes_within_the_code_resolution(torch, state_rounding):
  arrays = initial(0)
  tensors, optimizer = torch_run(torch, arrays, gradients(1))
  params = params_of([t.detach().numpy() for t in tensors])
  solver, state = optax_amsgrad.from_torch(
      optimizer.state_dict(), params, mu_dtype="int8", nu_dtype="int8",
      state_rounding=state_rounding)
  assert int(state[0].count) == STEPS
  check_handed_in(state, torch_moments(optimizer))
  # The state is the solver's own: its step takes it, compiled once with init's.
  update = jax.jit(solver.update)
  grads = jax.tree.map(jnp.ones_like, params)
  update(grads, solver.init(params), params)
  update(grads, state, params)
  assert update._cache_size() == 1


def test_torch_round_trip_writes_the_decoded_state(torch):
  arrays = initial(2)
  tensors, optimizer = torch_run(torch, arrays, gradients(3))
  original = torch_moments(optimizer)
  params = params_of([t.detach().numpy() for t in tensors])
  solver, state = optax_amsgrad.from_torch(
      optimizer.state_dict(), params, mu_dtype="int8", nu_dtype="int8")
  fresh = [torch.nn.Parameter(t.detach().clone()) for t in tensors]
  target = torch.optim.Adam(fresh, lr=LR, amsgrad=True)
  target.load_state_dict(optax_amsgrad.to_torch(state, target, solver=solver))
  moved = torch_moments(target)
  decoded = optax_amsgrad.decode_state(state)[0]
  for i, name in enumerate(("a", "b")):
    for k, field in enumerate(("mu", "nu", "nu_max")):
      assert moved[i][k].dtype == np.float32
      np.testing.assert_array_equal(moved[i][k], np.asarray(decoded._asdict()[field][name]))
  assert float(target.state_dict()["state"][0]["step"]) == STEPS
  # Back in torch, the moments are the original ones to the code's resolution.
  check_handed_in(state, original)


def test_to_torch_after_int8_steps_writes_decode_state(torch):
  arrays = initial(4)
  params = params_of(arrays)
  solver = optax_amsgrad.amsgrad(LR, mu_dtype="int8", nu_dtype="int8")
  state = solver.init(params)
  step = jax.jit(solver.update)
  for g in gradients(5):
    _, state = step(params_of(g), state, params)
  tensors = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
  optimizer = torch.optim.Adam(tensors, lr=LR, amsgrad=True)
  optimizer.load_state_dict(optax_amsgrad.to_torch(state, optimizer, solver=solver))
  decoded = optax_amsgrad.decode_state(state)[0]
  moved = torch_moments(optimizer)
  for k, field in enumerate(("mu", "nu", "nu_max")):
    np.testing.assert_array_equal(moved[0][k], np.asarray(decoded._asdict()[field]["a"]))
  # What torch reads is the state's nu_max, positive where it is in JAX.
  assert (moved[0][2] > 0).any()


def test_to_torch_checks_the_storage_of_solver_and_state(torch):
  arrays = initial(6)
  tensors, optimizer = torch_run(torch, arrays, gradients(7))
  params = params_of([t.detach().numpy() for t in tensors])
  int8_solver, int8_state = optax_amsgrad.from_torch(
      optimizer.state_dict(), params, mu_dtype="int8", nu_dtype="int8")
  float_solver, float_state = optax_amsgrad.from_torch(optimizer.state_dict(), params)
  with pytest.raises(ValueError) as error:
    optax_amsgrad.to_torch(int8_state, optimizer, solver=float_solver)
  message = str(error.value)
  assert ("mu_dtype: the solver stores the params' dtype, the state holds int8 (8-bit blocks) "
          "(leaf 0 ['a'])") in message
  assert "nu_dtype: the solver stores the params' dtype, the state holds int8" in message
  with pytest.raises(ValueError) as error:
    optax_amsgrad.to_torch(float_state, optimizer, solver=int8_solver)
  message = str(error.value)
  assert ("mu_dtype: the solver stores int8 (8-bit blocks), the state holds float32 "
          "(leaf 0 ['a'])") in message
  # Only the leaf that the solver keeps in blocks is named: the small one is
  # float32 under both.
  assert "['b']" not in message
  # Mixed storage: an int8 mu with a bfloat16 nu against a state of both in blocks.
  mixed = optax_amsgrad.amsgrad(LR, mu_dtype="int8", nu_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"nu_dtype: the solver stores bfloat16, the state "
                     r"holds int8 \(8-bit blocks\) \(leaf 0 \['a'\]\)") as error:
    optax_amsgrad.to_torch(int8_state, optimizer, solver=mixed)
  assert "mu_dtype" not in str(error.value)
  # A torch model in bfloat16 cannot hold the decoded float32 values.
  bf16 = [torch.nn.Parameter(t.detach().to(torch.bfloat16)) for t in tensors]
  with pytest.raises(ValueError, match=r"storage: the state's mu is int8 \(8-bit blocks\), "
                     r"read as float32, the torch optimizer keeps bfloat16"):
    optax_amsgrad.to_torch(int8_state, torch.optim.Adam(bf16, lr=LR, amsgrad=True),
                           solver=int8_solver)


def test_from_optax_refuses_an_int8_solver_for_its_float_state():
  import optax

  params = params_of(initial(8))
  theirs = optax.amsgrad(LR)
  state = theirs.init(params)
  solver = optax_amsgrad.amsgrad(LR, convention="optax", mu_dtype="int8", nu_dtype="int8")
  with pytest.raises(ValueError, match=r"mu_dtype: the solver stores int8 \(8-bit blocks\), "
                     r"the state holds float32 \(leaf 0 \['a'\]\)"):
    optax_amsgrad.from_optax(state, theirs, solver=solver)


# --- Keras ------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
  return pytest.importorskip("keras")


def keras_run(keras, arrays, grads):
  variables = [keras.Variable(a.copy(), dtype="float32", name=f"v{i}")
               for i, a in enumerate(arrays)]
  optimizer = keras.optimizers.Adam(LR, amsgrad=True)
  optimizer.build(variables)
  for step in grads:
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), v)
                               for g, v in zip(step, variables, strict=True)])
  return variables, optimizer


def keras_moments(optimizer) -> list[tuple[np.ndarray, ...]]:
  buffers = (optimizer._momentums, optimizer._velocities, optimizer._velocity_hats)
  return [tuple(np.array(b[i].value) for b in buffers) for i in range(len(SHAPES))]


def test_from_keras_quantizes_and_to_keras_writes_the_decoded_state(keras):
  arrays = initial(10)
  variables, optimizer = keras_run(keras, arrays, gradients(11))
  original = keras_moments(optimizer)
  params = params_of([np.array(v.value) for v in variables])
  solver, state = optax_amsgrad.from_keras(optimizer, params, mu_dtype="int8", nu_dtype="int8")
  assert int(state[0].count) == STEPS
  check_handed_in(state, original)
  target_variables = [keras.Variable(np.array(v.value), dtype="float32") for v in variables]
  target = keras.optimizers.Adam(LR, amsgrad=True)
  target.build(target_variables)
  optax_amsgrad.to_keras(state, target, solver=solver)
  decoded = optax_amsgrad.decode_state(state)[0]
  moved = keras_moments(target)
  for i, name in enumerate(("a", "b")):
    for k, field in enumerate(("mu", "nu", "nu_max")):
      np.testing.assert_array_equal(moved[i][k], np.asarray(decoded._asdict()[field][name]))
  assert int(target.iterations.value) == STEPS
  float_solver = optax_amsgrad.amsgrad(LR, eps=1e-7, convention="keras")
  with pytest.raises(ValueError, match=r"mu_dtype: the solver stores the params' dtype, the "
                     r"state holds int8 \(8-bit blocks\) \(leaf 0 \['a'\]\)"):
    optax_amsgrad.to_keras(state, target, solver=float_solver)


# --- chex-checked states of another storage format -----------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_update_names_a_state_of_another_storage_format(jit):
  params = params_of(initial(12))
  grads = jax.tree.map(jnp.ones_like, params)
  int8 = optax_amsgrad.amsgrad(LR, mu_dtype="int8", nu_dtype="int8")
  plain = optax_amsgrad.amsgrad(LR)

  def update(solver, state):
    step = jax.jit(solver.update) if jit else solver.update
    return step(grads, state, params)

  with pytest.raises(TypeError, match=r"the state's mu at \['a'\] is an array of float32, but "
                     r"this optimizer was made with mu_dtype=int8 and stores that leaf in "
                     r"8-bit blocks"):
    update(int8, plain.init(params))
  with pytest.raises(TypeError, match=r"the state's mu at \['a'\] is 8-bit blocks \(int8 "
                     r"storage\), but this optimizer was made with mu_dtype=None and stores "
                     r"that leaf as an array"):
    update(plain, int8.init(params))
  # nu alone in another format: nu is named.
  mu_only = optax_amsgrad.amsgrad(LR, mu_dtype="int8")
  with pytest.raises(TypeError, match=r"the state's nu at \['a'\] is 8-bit blocks \(int8 "
                     r"storage\), but this optimizer was made with nu_dtype=None"):
    update(mu_only, int8.init(params))


def test_mixed_storage_moves_in_and_out(torch):
  # mu in 8-bit blocks, nu and nu_max in bfloat16.
  arrays = initial(14)
  tensors, optimizer = torch_run(torch, arrays, gradients(15))
  original = torch_moments(optimizer)
  params = params_of([t.detach().numpy() for t in tensors])
  solver, state = optax_amsgrad.from_torch(
      optimizer.state_dict(), params, mu_dtype="int8", nu_dtype=jnp.bfloat16)
  inner = state[0]
  assert _blockwise.is_quantized(inner.mu["a"])
  assert inner.nu["a"].dtype == jnp.bfloat16 and inner.nu_max["a"].dtype == jnp.bfloat16
  decoded = optax_amsgrad.decode_state(state)[0]
  mu = np.asarray(decoded.mu["a"], np.float64)
  assert (np.abs(mu - original[0][0]) / resolution(original[0][0], "mu")).max() < 1.0
  target = torch.optim.Adam([torch.nn.Parameter(t.detach().clone()) for t in tensors],
                            lr=LR, amsgrad=True)
  target.load_state_dict(optax_amsgrad.to_torch(state, target, solver=solver))
  moved = torch_moments(target)
  for k, field in enumerate(("mu", "nu", "nu_max")):
    np.testing.assert_array_equal(moved[0][k], np.asarray(decoded._asdict()[field]["a"]))


def test_sharded_params_give_sharded_int8_state_and_one_compile():
  from scale_out.launch import script_env

  code = textwrap.dedent("""
      import json
      import jax, jax.numpy as jnp, numpy as np, optax
      from jax.sharding import NamedSharding, PartitionSpec as P
      import optax_amsgrad
      from optax_amsgrad import _blockwise

      mesh = jax.make_mesh((4,), ("x",))
      sharding = NamedSharding(mesh, P("x"))
      params = {"w": jax.device_put(jnp.ones((8, 600)), sharding),
                "b": jax.device_put(jnp.ones(4), NamedSharding(mesh, P()))}
      rng = np.random.default_rng(0)
      moments = {k: [rng.random(np.shape(p)).astype(np.float32) for _ in range(2)]
                 for k, p in params.items()}
      state_dict = {
          "state": {j: {"step": np.float32(5), "exp_avg": m - 0.5, "exp_avg_sq": v,
                        "max_exp_avg_sq": v + 1} for j, (m, v) in
                    enumerate(moments[k] for k in ("b", "w"))},
          "param_groups": [{"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8,
                            "weight_decay": 0, "amsgrad": True, "maximize": False,
                            "decoupled_weight_decay": False, "params": [0, 1]}],
      }
      solver, state = optax_amsgrad.from_torch(state_dict, params, mu_dtype="int8",
                                               nu_dtype="int8")
      init = solver.init(params)
      wrong = [str(path) for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state),
                                                  jax.tree.leaves(init))
               if a.sharding != b.sharding or a.committed != b.committed]
      codes = state[0].nu_max["w"].codes

      @jax.jit
      def step(params, state):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = solver.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      step(params, init)
      step(params, state)
      print(json.dumps({"wrong": wrong,
                        "quantized": _blockwise.is_quantized(state[0].mu["w"]),
                        "codes_sharded": codes.sharding.is_equivalent_to(sharding, 2),
                        "compiles": step._cache_size()}))
  """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=script_env(host_devices=4), timeout=120)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {"wrong": [], "quantized": True, "codes_sharded": True, "compiles": 1}
