"""The one-pass CPU handler against the XLA path and the float64 reference.

On CPU the moment update runs in the compiled handler (cpu/csrc/amsgrad_cpu.cc)
for real float32/bfloat16/float64 leaves; everything else, and every other
platform, takes the XLA path. The handler evaluates the same operations in the
same order; XLA:CPU contracts some ``a * b + c`` into fused multiply-adds, so
the two agree to one rounding per operation, not always bit for bit.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad
from optax_amsgrad import cpu

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import run_reference
from trajectories import CONVENTIONS, max_relative_difference, run_optax, scaled

TARGET = "optax_amsgrad_moments"


def _compiled_text(solver, params) -> str:
  state = solver.init(params)
  return jax.jit(lambda *args: solver.update(*args)).lower(
      params, state, params).compile().as_text()


def test_handler_is_built_and_registered():
  # CI installs the package with its compiled handler; without a compiler
  # the package still works, on the XLA path, and this test says so.
  assert optax_amsgrad.cpu_kernel_available()


@pytest.mark.parametrize(
    ("param_dtype", "options", "uses_kernel"),
    [
        (jnp.float32, {}, True),
        (jnp.float64, {}, True),
        (jnp.bfloat16, {}, True),
        (jnp.float32, {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}, True),
        (jnp.float32, {"nu_dtype": jnp.bfloat16, "state_rounding": "nearest"}, True),
        (jnp.float16, {}, False),
        (jnp.complex64, {}, False),
        (jnp.float64, {"nu_dtype": jnp.float32}, False),
    ],
)
def test_handler_is_used_for_the_dtypes_it_covers(param_dtype, options, uses_kernel):
  params = {"w": jnp.ones((7, 3), param_dtype)}
  kernel = optax_amsgrad.scale_by_amsgrad(**options, implementation="cpu")
  assert (TARGET in _compiled_text(kernel, params)) == uses_kernel
  xla = optax_amsgrad.scale_by_amsgrad(**options, implementation="xla")
  assert TARGET not in _compiled_text(xla, params)


def _as64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def _identical(a, b) -> np.ndarray:
  a, b = _as64(a), _as64(b)
  return (a == b) | (np.isnan(a) & np.isnan(b))


def _agree(a, b, scale, storage_dtype, compute_dtype) -> np.ndarray:
  """Where the two paths agree: equal (NaN with NaN), or apart by at most
  four roundings of the compute dtype relative to ``scale`` (the magnitude
  of the terms summed: a fused multiply-add rounds once where the handler
  rounds twice, so in cancellation the results differ by more than an ulp
  of the result), or, in a narrower storage dtype, by one storage step (a
  stochastic rounding decision on the other side of a threshold)."""
  equal = _identical(a, b)
  a, b = _as64(a), _as64(b)
  with np.errstate(invalid="ignore"):
    close = np.abs(a - b) <= 4 * float(jnp.finfo(compute_dtype).eps) * scale
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(b), 1e-300)))
                   - jnp.finfo(storage_dtype).nmant)
    neighbour = np.abs(a - b) <= step
  return equal | close | neighbour


def _gradients(rng: np.random.Generator, shape, step: int) -> np.ndarray:
  """Gradients over many scales, with zeros, subnormals, values beyond the
  saturation limit, and in a few steps infinities and NaN."""
  g = rng.normal(size=shape) * 10.0 ** rng.integers(-6, 4, size=shape)
  flat = g.reshape(-1)
  flat[::17] = 0.0
  flat[5::23] = 1e-40
  flat[7::29] = 3e30 * np.sign(flat[7::29] + 0.5)
  if step == 3:
    flat[11::31] = np.inf
    flat[13::37] = np.nan
  return g


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize(
    ("param_dtype", "options"),
    [
        (jnp.float32, {}),
        (jnp.float64, {}),
        (jnp.bfloat16, {}),
        (jnp.float32, {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}),
        (jnp.float32, {"nu_dtype": jnp.bfloat16, "state_rounding": "nearest"}),
        (jnp.float32, {"mu_dtype": jnp.bfloat16}),
    ],
)
def test_handler_matches_the_xla_path_step_by_step(convention, param_dtype, options):
  # From the same state, one step by each path. The two differ only where
  # XLA fuses a multiply and an add: by a few roundings of the terms, and
  # with narrow storage by one storage step where a rounding decision flips,
  # which must be rare. Infinities and NaN land in the same places.
  b1, b2 = 0.9, 0.999
  solver = optax_amsgrad.scale_by_amsgrad(b1, b2, convention=convention, **options,
                                          implementation="cpu")
  xla = optax_amsgrad.scale_by_amsgrad(b1, b2, convention=convention, **options,
                                       implementation="xla")
  shape = (300, 257)
  rng = np.random.default_rng(0)
  state = solver.init(jnp.zeros(shape, param_dtype))
  kernel_step = jax.jit(lambda g, state: solver.update(g, state))
  xla_step = jax.jit(lambda g, state: xla.update(g, state))
  compute = jnp.promote_types(param_dtype, jnp.float32)
  limit = np.sqrt(float(jnp.finfo(compute).max)) / 2
  for step in range(6):
    g = jnp.asarray(_gradients(rng, shape, step), param_dtype)
    u_kernel, s_kernel = kernel_step(g, state)
    u_xla, s_xla = xla_step(g, state)
    g64 = _as64(g)
    g64 = np.where(np.isinf(g64), g64, np.clip(g64, -limit, limit))
    t = step + 1
    # "optax" keeps nu_max bias-corrected.
    nu_max_scale = 1 / (1 - b2**t) if convention == "optax" else 1.0
    nu_scale = b2 * np.abs(_as64(state.nu)) + (1 - b2) * g64**2
    scales = {
        "mu": b1 * np.abs(_as64(state.mu)) + (1 - b1) * np.abs(g64),
        "nu": nu_scale,
        "nu_max": np.maximum(_as64(state.nu_max), nu_scale * nu_max_scale),
    }
    for name in scales:
      a, b = getattr(s_kernel, name), getattr(s_xla, name)
      assert a.dtype == b.dtype
      agree = _agree(a, b, scales[name], b.dtype, compute)
      assert agree.all(), (step, name, _as64(a)[~agree][:5], _as64(b)[~agree][:5])
      if jnp.finfo(b.dtype).nmant < jnp.finfo(compute).nmant:
        assert np.mean(~_identical(a, b)) < 2e-3, (step, name)
    # Where both paths stored the same moments, the updates agree to a few
    # roundings of the update itself.
    same = _identical(s_kernel.mu, s_xla.mu) & _identical(s_kernel.nu_max, s_xla.nu_max)
    u_agree = _agree(u_kernel, u_xla, np.abs(_as64(u_xla)), u_xla.dtype, u_xla.dtype)
    assert u_agree[same].all(), step
    assert same.mean() > 0.5
    assert int(s_kernel.count) == int(s_xla.count)
    state = s_xla


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_both_paths_follow_the_reference_in_float64(convention):
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 300, seed=11)
  params = initial_params(shapes)
  expected = run_reference(grads, params, learning_rate=1e-2, convention=convention)
  for implementation in ("cpu", "xla"):
    actual = run_optax(scaled(convention, implementation=implementation), grads, params)
    assert max_relative_difference(actual, expected) < 1e-12, implementation


def test_nu_max_stays_a_running_maximum_of_the_stored_nu_in_bfloat16():
  solver = optax_amsgrad.scale_by_amsgrad(
      mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, convention="optax"
  )
  rng = np.random.default_rng(1)
  state = solver.init(jnp.zeros(5000, jnp.float32))
  step = jax.jit(solver.update)
  previous = np.zeros(5000)
  for t in range(1, 200):
    scale = 10.0 if t % 50 == 0 else 1.0 / t
    _, state = step(jnp.asarray(rng.normal(size=5000) * scale, jnp.float32), state)
    nu_max = np.asarray(state.nu_max, np.float64)
    nu = np.asarray(state.nu, np.float64)
    bias_correction = 1 - 0.999**t
    assert np.all(nu_max >= previous)
    # "optax" keeps the bias-corrected maximum; the stored nu, rounded the
    # same way, stays below it.
    assert np.all(nu_max >= np.asarray(
        jnp.asarray(nu / bias_correction, jnp.float32).astype(jnp.bfloat16), np.float64
    ) * (1 - 2**-8))
    previous = nu_max


# 8-bit state: the blockwise handler (leaves of at least 4096 elements).
INT8 = {"mu_dtype": "int8", "nu_dtype": "int8"}
BLOCKWISE_TARGET = "optax_amsgrad_blockwise_moments"
STATE_OPTIONS = [{}, {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}, INT8]


@pytest.mark.parametrize("options", STATE_OPTIONS)
def test_vmapped_members_equal_separate_runs(options):
  # Under vmap the handler takes the batch as rows, each with its own
  # hyperparameters and rounding stream: bit-identical to separate runs.
  def make(lr, b2, seed):
    return optax.inject_hyperparams(optax_amsgrad.amsgrad)(
        learning_rate=lr, b2=b2, seed=seed, **options
    )

  lrs = jnp.array([1e-2, 3e-3, 1e-3], jnp.float32)
  b2s = jnp.array([0.99, 0.999, 0.95], jnp.float32)
  seeds = jnp.array([0, 1, 2], jnp.uint32)
  params = {"w": jnp.linspace(-1, 1, 6400, dtype=jnp.float32).reshape(20, 320),
            "b": jnp.zeros((32,), jnp.float32)}
  grads = [jax.tree.map(lambda x, t=t: jnp.sin(3 * x + t) + 0.1 * t, params)
           for t in range(20)]

  def run(lr, b2, seed):
    solver = make(lr, b2, seed)
    p, state = params, solver.init(params)
    for g in grads:
      u, state = solver.update(g, state, p)
      p = optax.apply_updates(p, u)
    return p, state.inner_state[0]

  batched = jax.jit(jax.vmap(run))(lrs, b2s, seeds)
  for i in range(3):
    single = jax.jit(run)(lrs[i], b2s[i], seeds[i])
    chex.assert_trees_all_equal(single, jax.tree.map(lambda b, i=i: b[i], batched))
  # The members really differ: the rows got their own scalars.
  assert not np.array_equal(batched[0]["w"][0], batched[0]["w"][1])


@pytest.mark.parametrize("options", STATE_OPTIONS)
def test_donated_state_is_updated_in_place(options):
  solver = optax_amsgrad.amsgrad(1e-3, **options)
  params = {"w": jnp.ones((1000, 1000), jnp.float32)}
  state = solver.init(params)

  def step(params, state, grads):
    updates, state = solver.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  assert (BLOCKWISE_TARGET if options == INT8 else TARGET) in compiled.as_text()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert compiled.memory_analysis().temp_size_in_bytes < 0.01 * state_bytes


def _copies(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _run_steps(step, params, state, grads, pauses):
  for g, pause in zip(grads, pauses, strict=True):
    params, state = step(params, state, g)
    jax.block_until_ready(params)
    time.sleep(pause)
  return params, state


@pytest.mark.parametrize("options", STATE_OPTIONS)
def test_results_do_not_depend_on_timing_or_concurrent_calls(options):
  # Large leaves are cut into blocks claimed by the caller and XLA's pool,
  # whose threads may start late or be busy with another call, and the
  # caller spins for the last blocks. Every way gives the same bits.
  solver = optax_amsgrad.amsgradw(1e-2, weight_decay=1e-2, **options,
                                   implementation="cpu")
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(1000, 300)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(70_001,)), jnp.float32)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
           for _ in range(8)]

  def flip(tree):
    return jax.tree.map(lambda x: jnp.flip(x) if jnp.ndim(x) else x, tree)

  def two_steps(params, state, grads):
    # What the first step wrote is read as soon as its call returns, from
    # the end (where a late thread's block would be): a step returning before
    # every block is written would show.
    params, state = optax_amsgrad.apply_step(solver, grads, state, params)
    params, state = flip(params), flip(state)
    return optax_amsgrad.apply_step(solver, flip(grads), state, params)

  step = jax.jit(two_steps, donate_argnums=(0, 1))
  back_to_back = _run_steps(step, _copies(params), solver.init(params), grads, [0.0] * 8)
  paused = _run_steps(step, _copies(params), solver.init(params), grads,
                      [0.0, 5e-5, 0.0, 2e-3, 1e-4, 0.0, 1e-2, 0.0])
  results = [None] * 4

  def run(i):
    results[i] = _run_steps(step, _copies(params), solver.init(params), grads,
                            [0.0, 1e-4 * i] * 4)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  for other in [paused, *results]:
    # Bit for bit (signed zeros too), which value equality would not see.
    for a, b in zip(jax.tree.leaves(back_to_back), jax.tree.leaves(other), strict=True):
      assert _identical(a, b).all()
  if not options:
    solver = optax_amsgrad.amsgradw(1e-2, weight_decay=1e-2, implementation="xla")
    xla_step = jax.jit(two_steps)
    expected, _ = _run_steps(xla_step, params, solver.init(params), grads, [0.0] * 8)
    # A rounding of p and of the update (lr 1e-2) per step apart, at most.
    for name in params:
      np.testing.assert_allclose(back_to_back[0][name], expected[name], rtol=1e-6, atol=1e-8)


def _int8_gradients(rng: np.random.Generator, shape, step: int) -> np.ndarray:
  """Six decades inside every block and rows a thousandfold apart, with
  zeros, float32 subnormals and values past the saturation limit; infinities
  and NaN in one step, a spike of 1e4 on every seventh element in another."""
  g = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3, size=shape)
  g *= 10.0 ** rng.integers(-3, 3, size=(*shape[:-1], 1))
  flat = g.reshape(-1)
  flat[::97] = 0.0
  flat[5::301] = 1e-40
  flat[7::499] = 3e30
  if step == 3:
    flat[11::1031] = np.inf
    flat[13::2039] = np.nan
  if step == 5:
    flat[::7] *= 1e4
  return g.astype(np.float32)


def _codes_agree(a, b) -> tuple[np.ndarray, np.ndarray]:
  """(blocks whose scales are the same, elements whose codes are the same)
  of two 8-bit buffers."""
  return (np.asarray(a.exponents) == np.asarray(b.exponents),
          np.asarray(a.codes) == np.asarray(b.codes))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize(("shape", "update_size"), [
    ((5000,), None), ((40, 300), None), ((3, 7, 256), None),
    # A leaf above cpu.KERNEL_UPDATE_SIZE: XLA decodes its update.
    ((40, 300), 11_999),
])
def test_int8_handler_matches_the_xla_path_step_by_step(monkeypatch, convention, rounding,
                                                       shape, update_size):
  # From the same state, one step by each path, through update and through
  # apply_step (against update and apply_updates compiled apart, as the
  # handler rounds). The codes and scales are computed by the same integer
  # operations from moments that differ at most where XLA fuses a multiply
  # and an add: a code differs only where that moves a value across a
  # rounding threshold, so almost never, and then by one code.
  kw = {**INT8, "state_rounding": rounding, "convention": convention}
  solvers = {impl: optax_amsgrad.amsgradw(1e-3, weight_decay=1e-2, **kw, implementation=impl)
             for impl in ("cpu", "xla")}
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel_update = jax.jit(solvers["cpu"].update)
  kernel_apply = jax.jit(lambda g, s, p: optax_amsgrad.apply_step(solvers["cpu"], g, s, p))
  xla_update = jax.jit(solvers["xla"].update)
  xla_apply = jax.jit(optax.apply_updates)
  if update_size is not None:
    monkeypatch.setattr(cpu, "KERNEL_UPDATE_SIZE", update_size)
  targets = {kernel_update: "optax_amsgrad_blockwise_moments" if update_size is not None
             else "optax_amsgrad_blockwise_update",
             kernel_apply: "optax_amsgrad_blockwise_step"}
  for compiled, target in targets.items():
    text = compiled.lower(params, solvers["cpu"].init(params), params).as_text()
    assert re.findall(r"optax_amsgrad_blockwise_\w+", text) == [target]
  state = solvers["xla"].init(params)
  differing = compared = 0
  for step in range(7):
    g = jnp.asarray(_int8_gradients(rng, shape, step))
    u_xla, s_xla = xla_update(g, state, params)
    p_xla = xla_apply(params, u_xla)
    u_kernel, s_kernel = kernel_update(g, state, params)
    p_kernel, s_applied = kernel_apply(g, state, params)
    chex.assert_trees_all_equal(s_kernel, s_applied)
    same = np.ones(shape, bool)
    for name in ("mu", "nu", "nu_max"):
      a, b = getattr(s_kernel[0], name), getattr(s_xla[0], name)
      blocks, codes = _codes_agree(a, b)
      assert blocks.mean() > 0.99, (step, name)
      in_same_blocks = np.repeat(blocks, 256, axis=-1)[..., :shape[-1]]
      # Codes read as integers are in the order of their values.
      neighbours = np.abs(np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32)) <= 1
      assert neighbours[in_same_blocks].all(), (step, name)
      differing += int((~codes).sum())
      compared += codes.size
      same &= codes & in_same_blocks
    # Where the stored moments are the same, so are the updates (the
    # handler writes them for leaves this small, from the codes, in the XLA
    # path's operations), and the params to a rounding of the step.
    assert _identical(u_kernel, u_xla)[same].all(), step
    p_agree = _agree(p_kernel, p_xla, np.abs(_as64(params)) + 1e-3 * np.abs(_as64(u_xla)),
                     jnp.float32, jnp.float32)
    assert p_agree[same].all(), step
    assert not _identical(p_kernel, params).all()
    state, params = s_xla, p_xla
  assert differing <= 1e-4 * compared, (differing, compared)


def test_without_the_compiled_handler_everything_takes_the_xla_path():
  # As installed without a C++ compiler: the extension cannot be imported.
  code = """
import sys
sys.modules["optax_amsgrad.cpu._amsgrad_cpu"] = None  # import fails
import jax, jax.numpy as jnp, numpy as np, optax
jax.config.update("jax_enable_x64", True)
import optax_amsgrad
assert not optax_amsgrad.cpu_kernel_available()
solver = optax_amsgrad.amsgradw(0.1, weight_decay=0.1)
params = {"w": jnp.array([1.0, -2.0, 3.0])}
state = solver.init(params)
grads = {"w": jnp.array([0.5, -1.0, 2.0])}
step = jax.jit(lambda g, s, p: optax_amsgrad.apply_step(solver, g, s, p))
assert "optax_amsgrad" not in step.lower(grads, state, params).as_text()
new_params, _ = step(grads, state, params)
# First step: u = sign(g) to within eps; decoupled decay 0.1 * p.
expected = np.array([1.0, -2.0, 3.0]) - 0.1 * (np.sign([0.5, -1.0, 2.0])
                                                + 0.1 * np.array([1.0, -2.0, 3.0]))
np.testing.assert_allclose(np.asarray(new_params["w"]), expected, rtol=1e-7)
print("ok")
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.strip().endswith("ok")


def test_int8_handler_refuses_buffers_that_do_not_match():
  # Called directly with one block exponent too few: the handler names the
  # mismatch instead of reading past the buffer.
  from optax_amsgrad.cpu import _ffi

  assert _ffi.available()  # registers the handlers
  g = jnp.ones((4, 300), jnp.float32)
  codes = jnp.zeros((4, 300), jnp.uint8)
  exponents = jnp.zeros((4, 2), jnp.int8)
  coefficients = _ffi.pack({"b1": 0.9, "b2": 0.999, "one_minus_b1": 0.1,
                            "one_minus_b2": 0.001, "nu_max_scale": 1.0}, jnp.float32)
  keys = jnp.zeros((1, 2), jnp.uint32)

  def call(exponents):
    leaf = (g, codes, exponents, codes, exponents, codes, exponents)
    return jax.jit(lambda: _ffi.blockwise(coefficients, keys, [leaf], stochastic=False))()

  m_codes, m_exponents = call(exponents)[0][:2]
  assert m_codes.shape == (4, 300) and m_exponents.shape == (4, 2)
  with pytest.raises(Exception, match="the codes and exponents do not match g"):
    jax.block_until_ready(call(jnp.zeros((4, 1), jnp.int8)))
