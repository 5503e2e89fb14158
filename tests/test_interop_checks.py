"""Interop refuses what it cannot carry exactly, naming each difference.

``to_torch``/``to_keras`` check the solver against what the target optimizer
computes, ``from_optax`` reads Optax's bias correction, ``from_keras`` reads
``exclude_from_weight_decay`` or asks for a built optimizer, and a Keras
without the private attributes read is named. Every array asks for its dtype,
so that these tests mean the same with x64 on or off.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad
from optax_amsgrad import interop

F32 = np.float32


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def keras():
  return pytest.importorskip("keras")


def _stepped(solver, params, steps=3, seed=0):
  """The solver's state after a few steps with random float32 gradients."""
  rng = np.random.default_rng(seed)
  state = solver.init(params)
  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, state = solver.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return state


# --- to_torch -----------------------------------------------------------------


def _torch_weights(torch, dtype=None):
  dtype = dtype or torch.float32
  return [torch.zeros(3, dtype=dtype, requires_grad=True),
          torch.zeros(2, dtype=dtype, requires_grad=True)]


def _params(dtype=jnp.float32):
  return [jnp.zeros(3, dtype), jnp.zeros(2, dtype)]


@pytest.mark.parity
@pytest.mark.parametrize("convention", ["optax", "keras", "paper"])
def test_to_torch_refuses_another_convention(torch, convention):
  # An "optax" state's nu_max is bias-corrected: max_exp_avg_sq would be read
  # as a raw maximum. "keras" and "paper" continue under another formula.
  solver = optax_amsgrad.amsgrad(1e-2, convention=convention)
  state = _stepped(solver, _params())
  target = torch.optim.Adam(_torch_weights(torch), lr=1e-2, amsgrad=True)
  with pytest.raises(ValueError, match=re.escape(
      f"convention: the solver has '{convention}', the target 'pytorch' (leaf 0 [0], leaf 1 [1])")):
    optax_amsgrad.to_torch(state, target, solver=solver)


@pytest.mark.parity
def test_to_torch_names_every_difference_in_one_message(torch):
  solver = optax_amsgrad.amsgrad(1e-2, b1=0.8, eps=1e-6, eps_root=1e-12, convention="keras")
  state = _stepped(solver, _params())
  target = torch.optim.AdamW(_torch_weights(torch), lr=1e-3, weight_decay=0.1, amsgrad=True)
  with pytest.raises(ValueError) as raised:
    optax_amsgrad.to_torch(state, target, solver=solver)
  message = str(raised.value)
  for line in ("convention: the solver has 'keras', the target 'pytorch'",
               "b1: the solver has 0.8, the target 0.9",
               "eps: the solver has 1e-06, the target 1e-08",
               "eps_root: the solver has 1e-12, the target 0.0",
               "learning_rate: the solver has 0.01, the target 0.001",
               "weight decay: the solver has no weight decay, the target decoupled "
               "weight_decay=0.1"):
    assert f"{line} (leaf 0 [0], leaf 1 [1])" in message, (line, message)
  # The target keeps its own hyperparameters.
  assert target.param_groups[0]["lr"] == 1e-3
  assert target.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parity
def test_to_torch_tells_coupled_from_decoupled_weight_decay(torch):
  coupled = interop.coupled_weight_decay(0.1, optax_amsgrad.amsgrad(1e-2))
  decoupled = optax_amsgrad.amsgradw(1e-2, weight_decay=0.1)
  params = _params()
  adam = torch.optim.Adam(_torch_weights(torch), lr=1e-2, weight_decay=0.1, amsgrad=True)
  adamw = torch.optim.AdamW(_torch_weights(torch), lr=1e-2, weight_decay=0.1, amsgrad=True)
  for solver, target, ours, theirs in ((coupled, adamw, "coupled", "decoupled"),
                                       (decoupled, adam, "decoupled", "coupled")):
    with pytest.raises(ValueError, match=re.escape(
        f"weight decay: the solver has {ours} weight_decay=0.1, the target {theirs} "
        "weight_decay=0.1")):
      optax_amsgrad.to_torch(_stepped(solver, params), target, solver=solver)
  # Each with its own form goes through.
  for solver, target in ((coupled, adam), (decoupled, adamw)):
    target.load_state_dict(
        optax_amsgrad.to_torch(_stepped(solver, params), target, solver=solver))


@pytest.mark.parity
def test_to_torch_masked_decay_against_a_group_without_it(torch):
  # amsgradw with a mask decays leaf 0 only; torch decays leaf 0 in its
  # first group and nothing in the second: the same. Swapped, both differ.
  solver = optax_amsgrad.amsgradw(1e-2, weight_decay=0.1, mask=[True, False])
  state = _stepped(solver, _params())
  w = _torch_weights(torch)
  same = torch.optim.AdamW([{"params": w[:1]}, {"params": w[1:], "weight_decay": 0.0}],
                           lr=1e-2, weight_decay=0.1, amsgrad=True)
  optax_amsgrad.to_torch(state, same, solver=solver)
  swapped = torch.optim.AdamW([{"params": w[:1], "weight_decay": 0.0}, {"params": w[1:]}],
                              lr=1e-2, weight_decay=0.1, amsgrad=True)
  with pytest.raises(ValueError) as raised:
    optax_amsgrad.to_torch(state, swapped, solver=solver)
  assert ("the solver has decoupled weight_decay=0.1, the target no weight decay (leaf 0 [0])"
          in str(raised.value))
  assert ("the solver has no weight decay, the target decoupled weight_decay=0.1 (leaf 1 [1])"
          in str(raised.value))


@pytest.mark.parity
def test_to_torch_checks_the_storage(torch):
  params = _params()
  # A state stored wider than the torch parameters would be rounded.
  solver = optax_amsgrad.amsgrad(1e-2)
  target = torch.optim.Adam(_torch_weights(torch, torch.bfloat16), lr=1e-2, amsgrad=True)
  with pytest.raises(ValueError, match=re.escape(
      "storage: the state's mu is float32, the torch optimizer keeps bfloat16 (it would be "
      "rounded) (leaf 0 [0], leaf 1 [1])")):
    optax_amsgrad.to_torch(_stepped(solver, params), target, solver=solver)
  # A solver whose storage is not the state's is not the state's solver.
  narrow = optax_amsgrad.amsgrad(1e-2, mu_dtype=jnp.bfloat16)
  target = torch.optim.Adam(_torch_weights(torch), lr=1e-2, amsgrad=True)
  with pytest.raises(ValueError, match=re.escape(
      "mu_dtype: the solver stores bfloat16, the state holds float32")):
    optax_amsgrad.to_torch(_stepped(solver, params), target, solver=narrow)
  # Narrower moments widen exactly.
  optax_amsgrad.to_torch(_stepped(narrow, params), target, solver=narrow)


@pytest.mark.parity
def test_to_torch_asks_for_a_solver_it_can_read(torch):
  plain = optax.chain(optax.add_decayed_weights(0.1), optax_amsgrad.amsgrad(1e-2))
  state = _stepped(plain, _params())
  target = torch.optim.Adam(_torch_weights(torch), lr=1e-2, weight_decay=0.1, amsgrad=True)
  with pytest.raises(TypeError, match=r"solver: cannot read what .* computes .*"
                                      r"optax_amsgrad\.interop\.coupled_weight_decay"):
    optax_amsgrad.to_torch(state, target, solver=plain)
  with pytest.raises(TypeError, match="solver"):
    optax_amsgrad.to_torch(state, target)  # the solver is required
  # The same chain, made to say what it is.
  described = interop.coupled_weight_decay(0.1, optax_amsgrad.amsgrad(1e-2))
  optax_amsgrad.to_torch(state, target, solver=described)


@pytest.mark.parity
def test_bare_scale_by_amsgrad_is_checked_without_a_learning_rate(torch):
  core = optax_amsgrad.scale_by_amsgrad(b1=0.8)
  solver = optax.chain(core, optax.scale(-1e-2))
  state = _stepped(solver, _params())
  target = torch.optim.Adam(_torch_weights(torch), lr=1e-2, betas=(0.8, 0.999), amsgrad=True)
  optax_amsgrad.to_torch(state, target, solver=core)
  target = torch.optim.Adam(_torch_weights(torch), lr=1e-2, amsgrad=True)
  with pytest.raises(ValueError, match=r"b1: the solver has 0.8, the target 0.9"):
    optax_amsgrad.to_torch(state, target, solver=core)


# --- from_optax -----------------------------------------------------------------


def _run(solver, params, state, grads):
  trajectory = []
  for g in grads:
    updates, state = solver.update(g, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
  return params, state, trajectory


def _grads(steps, seed):
  rng = np.random.default_rng(seed)
  return [[jnp.asarray(np.where(rng.random(4) < 0.2, 30, 1) * rng.normal(size=4), F32)]
          for _ in range(steps)]


def test_from_optax_reads_the_bias_correction_of_the_paper():
  theirs = optax.amsgrad(1e-2, bias_correction_mu=False, bias_correction_nu=False)
  params = [jnp.asarray(np.linspace(-1, 1, 4), F32)]
  grads = _grads(30, seed=1)
  _, _, expected = _run(theirs, params, theirs.init(params), grads)
  moved_params, state, _ = _run(theirs, params, theirs.init(params), grads[:15])
  # Optax's default reading (convention="optax") is refused, naming why.
  with pytest.raises(ValueError, match=re.escape(
      "the Optax optimizer (bias_correction_mu=False, bias_correction_nu=False) computes, so "
      "the run would not continue on its trajectory:\n  convention: the solver has 'optax', "
      "the target 'paper' (leaf 0 [0])")):
    optax_amsgrad.from_optax(state, theirs, solver=optax_amsgrad.amsgrad(1e-2, convention="optax"))
  ours = optax_amsgrad.amsgrad(1e-2, convention="paper")
  moved = optax_amsgrad.from_optax(state, theirs, solver=ours)
  _, _, actual = _run(ours, moved_params, moved, grads[15:])
  # Two float32 implementations of one formula; "optax" differs by percent here.
  for a, b in zip(actual, expected[15:], strict=True):
    np.testing.assert_allclose(a[0], b[0], rtol=2e-6, atol=0)


def test_from_optax_refuses_one_bias_correction_without_the_other():
  for mu, nu in ((True, False), (False, True)):
    theirs = optax.amsgrad(1e-2, bias_correction_mu=mu, bias_correction_nu=nu)
    state = theirs.init([jnp.zeros(4, F32)])
    solver = optax_amsgrad.amsgrad(1e-2, convention="optax")
    with pytest.raises(ValueError, match=re.escape(
        f"bias_correction_mu={mu} with bias_correction_nu={nu} is no convention")):
      optax_amsgrad.from_optax(state, theirs, solver=solver)
    with pytest.raises(ValueError, match="is no convention"):
      optax_amsgrad.from_optax(state, solver=solver,
                               bias_correction_mu=mu, bias_correction_nu=nu)


def test_from_optax_needs_the_flags_or_the_optimizer():
  theirs = optax.amsgrad(1e-2)
  state = theirs.init([jnp.zeros(4, F32)])
  solver = optax_amsgrad.amsgrad(1e-2, convention="optax")
  with pytest.raises(TypeError, match=r"pass optimizer= .* or both bias_correction_mu= and "
                                      r"bias_correction_nu="):
    optax_amsgrad.from_optax(state, solver=solver)
  optax_amsgrad.from_optax(state, solver=solver, bias_correction_mu=True, bias_correction_nu=True)
  with pytest.raises(ValueError, match="bias_correction_nu=False but the optimizer has "
                                       "bias_correction_nu=True"):
    optax_amsgrad.from_optax(state, theirs, solver=solver, bias_correction_nu=False)
  with pytest.raises(ValueError, match=r"found 0 optax\.scale_by_amsgrad"):
    optax_amsgrad.from_optax(state, optax.adam(1e-2), solver=solver)


def test_from_optax_checks_the_hyperparameters_against_the_optimizer():
  theirs = optax.amsgrad(1e-2, b1=0.8, eps=1e-6)
  state = theirs.init([jnp.zeros(4, F32)])
  with pytest.raises(ValueError) as raised:
    optax_amsgrad.from_optax(state, theirs, solver=optax_amsgrad.amsgrad(1e-2, convention="optax"))
  assert "b1: the solver has 0.9, the target 0.8 (leaf 0 [0])" in str(raised.value)
  assert "eps: the solver has 1e-08, the target 1e-06 (leaf 0 [0])" in str(raised.value)
  # The solver's storage is the state's.
  with pytest.raises(ValueError, match=re.escape(
      "mu_dtype: the solver stores bfloat16, the state holds float32 (leaf 0 [0])")):
    optax_amsgrad.from_optax(state, theirs, solver=optax_amsgrad.amsgrad(
        1e-2, b1=0.8, eps=1e-6, mu_dtype=jnp.bfloat16, convention="optax"))
  same = optax_amsgrad.amsgrad(1e-2, b1=0.8, eps=1e-6, convention="optax")
  optax_amsgrad.from_optax(state, theirs, solver=same)
  # Found in a chain as well.
  chained = optax.chain(optax.clip(1.0), theirs)
  optax_amsgrad.from_optax(chained.init([jnp.zeros(4, F32)]), chained, solver=same)


# --- Keras ----------------------------------------------------------------------


def _keras_variables(keras):
  return [keras.Variable(np.linspace(-1, 1, 3).astype(F32), dtype="float32", name="kernel"),
          keras.Variable(np.array([0.5, -2.0], F32), dtype="float32", name="bias")]


def _keras_step_with_zero_gradients(keras, optimizer, variables):
  optimizer.apply_gradients([(keras.ops.zeros(v.shape, "float32"), v) for v in variables])
  return [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]


@pytest.mark.parity
@pytest.mark.parametrize("exclude", ["var_names", "var_list"])
def test_from_keras_reads_weight_decay_exclusions_or_asks_to_build(keras, exclude):
  variables = _keras_variables(keras)
  optimizer = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5, amsgrad=True)
  if exclude == "var_names":
    optimizer.exclude_from_weight_decay(var_names=["bias"])
  else:
    optimizer.exclude_from_weight_decay(var_list=[variables[1]])
  params = [jnp.asarray(np.asarray(v), F32) for v in variables]
  # Unbuilt, the exclusions are not yet matched to variables: refused.
  with pytest.raises(ValueError, match=r"keras_optimizer is not built and excludes variables "
                                       r"from its weight decay.*build it first"):
    optax_amsgrad.from_keras(optimizer, params)
  optimizer.build(variables)
  solver, state = optax_amsgrad.from_keras(optimizer, params)
  zeros = [jnp.zeros(3, F32), jnp.zeros(2, F32)]
  updates, _ = solver.update(zeros, state, params)
  after = _keras_step_with_zero_gradients(keras, optimizer, variables)
  # With a zero gradient only the decay moves: not the bias, as in Keras.
  np.testing.assert_array_equal(updates[1], np.zeros(2, F32))
  np.testing.assert_array_equal(after[1], np.asarray(params[1]))
  np.testing.assert_allclose(np.asarray(params[0]) + np.asarray(updates[0]), after[0],
                             rtol=1e-6)
  assert np.all(np.asarray(updates[0])[np.asarray(params[0]) != 0] != 0)


@pytest.mark.parity
def test_unbuilt_keras_optimizer_without_exclusions_decays_everything(keras):
  optimizer = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5, amsgrad=True)
  optimizer.exclude_from_weight_decay()  # configures nothing
  params = [jnp.ones(3, F32), jnp.ones(2, F32)]
  solver, state = optax_amsgrad.from_keras(optimizer, params)
  updates, _ = solver.update([jnp.zeros(3, F32), jnp.zeros(2, F32)], state, params)
  for leaf in updates:
    np.testing.assert_allclose(leaf, -0.05, rtol=1e-6)


def _built(keras, variables, **options):
  name = options.pop("optimizer", "Adam")
  exclude = options.pop("exclude", None)
  optimizer = getattr(keras.optimizers, name)(amsgrad=True, **options)
  if exclude:
    optimizer.exclude_from_weight_decay(var_names=exclude)
  optimizer.build(variables)
  return optimizer


@pytest.mark.parity
def test_to_keras_checks_the_solver(keras):
  params = _params()
  variables = _keras_variables(keras)
  # Keras holds its learning rate in float32: 1e-3 is its float32 value.
  target = _built(keras, variables, learning_rate=1e-3)
  solver = optax_amsgrad.amsgrad(1e-3, eps=1e-7, convention="keras")
  optax_amsgrad.to_keras(_stepped(solver, params), target, solver=solver)
  assert int(target.iterations) == 3
  torch_like = optax_amsgrad.amsgrad(1e-3, eps=1e-7)
  with pytest.raises(ValueError, match=re.escape(
      "convention: the solver has 'pytorch', the target 'keras' (leaf 0 [0], leaf 1 [1])")):
    optax_amsgrad.to_keras(_stepped(torch_like, params), target, solver=torch_like)
  # Keras excludes the bias from its decay; a solver that decays it differs.
  target = _built(keras, variables, optimizer="AdamW", learning_rate=1e-3, weight_decay=0.125,
                  exclude=["bias"])
  everywhere = optax_amsgrad.amsgradw(1e-3, eps=1e-7, weight_decay=0.125, convention="keras")
  with pytest.raises(ValueError, match=re.escape(
      "weight decay: the solver has decoupled weight_decay=0.125, the target no weight decay "
      "(leaf 1 [1])")):
    optax_amsgrad.to_keras(_stepped(everywhere, params), target, solver=everywhere)
  masked = optax_amsgrad.amsgradw(1e-3, eps=1e-7, weight_decay=0.125, mask=[True, False],
                                  convention="keras")
  optax_amsgrad.to_keras(_stepped(masked, params), target, solver=masked)
  # The solver from_keras returns goes back.
  solver, state = optax_amsgrad.from_keras(target, params)
  optax_amsgrad.to_keras(state, target, solver=solver)


@pytest.mark.parity
@pytest.mark.parametrize("missing", ["_velocity_hats", "_trainable_variables", "_learning_rate",
                                     "_use_weight_decay"])
def test_missing_keras_private_attribute_names_the_keras_version(keras, monkeypatch, missing):
  variables = _keras_variables(keras)
  optimizer = _built(keras, variables, optimizer="AdamW", weight_decay=0.125)
  params = _params()
  # Removed from the instance, or hidden where it is the class's.
  if missing in vars(optimizer):
    monkeypatch.delattr(optimizer, missing)
  else:
    monkeypatch.setattr(type(optimizer), missing, property(lambda self: _raise(missing)))
  message = (rf"has no {missing}: .* tested for keras{re.escape(interop.KERAS_TESTED)}, and "
             rf"Keras {re.escape(keras.__version__)} is installed")
  with pytest.raises(RuntimeError, match=message):
    optax_amsgrad.from_keras(optimizer, params)
  solver = optax_amsgrad.amsgradw(1e-3, eps=1e-7, weight_decay=0.125, convention="keras")
  with pytest.raises(RuntimeError, match=message):
    optax_amsgrad.to_keras(solver.init(params), optimizer, solver=solver)


def _raise(name):
  raise AttributeError(name)


@pytest.mark.parity
def test_installed_keras_is_in_the_tested_range(keras):
  from packaging.specifiers import SpecifierSet

  assert keras.__version__ in SpecifierSet(interop.KERAS_TESTED)


@pytest.mark.parity
def test_from_torch_solver_goes_back_through_to_torch(torch):
  # Two param groups, one with Adam's coupled weight decay: from_torch's
  # partition and coupled chain say what they are, and to_torch reads them.
  w = _torch_weights(torch)
  optimizer = torch.optim.Adam([{"params": w[:1], "betas": (0.8, 0.99)},
                                {"params": w[1:], "lr": 3e-3, "weight_decay": 0.05}],
                               lr=1e-2, amsgrad=True)
  for tensor in w:
    tensor.grad = torch.ones_like(tensor)
  optimizer.step()
  state_dict = optimizer.state_dict()
  solver, state = optax_amsgrad.from_torch(state_dict, _params())
  back = optax_amsgrad.to_torch(state, optimizer, solver=solver)
  for j, entry in state_dict["state"].items():
    for key, value in entry.items():
      assert torch.equal(back["state"][j][key], value), (j, key)
  # The same groups with the decay on the other one differ there, and only there.
  swapped = torch.optim.Adam([{"params": w[:1], "betas": (0.8, 0.99), "weight_decay": 0.05},
                              {"params": w[1:], "lr": 3e-3}], lr=1e-2, amsgrad=True)
  with pytest.raises(ValueError) as raised:
    optax_amsgrad.to_torch(state, swapped, solver=solver)
  lines = str(raised.value).splitlines()[1:-1]
  assert lines == [
      "  weight decay: the solver has no weight decay, the target coupled weight_decay=0.05 "
      "(leaf 0 [0])",
      "  weight decay: the solver has coupled weight_decay=0.05, the target no weight decay "
      "(leaf 1 [1])",
  ], lines
