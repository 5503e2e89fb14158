"""AMSGrad on sharded params: where the state lives, what the update
communicates, and data-parallel training on eight host devices.

The checks run in one process of their own (tests/scale_out/eight_devices.py)
started with eight host CPU devices; this module asserts on what it reports.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scale_out.launch import run_script
from scale_out.training import relative_difference

OPTIMIZERS = [
    "pytorch",
    "optax_bfloat16",
    "keras",
    "paper_b1_schedule",
    "amsgradw",
    "inject_hyperparams",
]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("eight_devices")
  run_script("eight_devices.py", [str(out)], host_devices=8, timeout=300)
  return json.loads((out / "results.json").read_text()), out


def test_init_gives_every_state_leaf_its_param_sharding(eight_devices):
  report, _ = eight_devices
  expected = {
      f"{axes}/{opt}/{way}"
      for axes, ways in (
          ("Auto", ["eager", "jit", "shape_dtype_struct", "compiled_output_shardings"]),
          ("Explicit", ["eager", "jit", "shape_dtype_struct",
                        "compiled_output_shardings", "eval_shape"]),
      )
      for opt in OPTIMIZERS
      for way in ways
  }
  assert set(report["init"]) == expected
  wrong = {case: problems for case, problems in report["init"].items() if problems}
  assert not wrong


def test_sharding_is_stable_across_jitted_steps(eight_devices):
  report, _ = eight_devices
  assert set(report["steps"]) == {
      "Auto/pytorch", "Auto/inject_hyperparams", "Explicit/optax_bfloat16"
  }
  wrong = {case: problems for case, problems in report["steps"].items() if problems}
  assert not wrong


def test_fully_sharded_update_has_no_collectives(eight_devices):
  report, _ = eight_devices
  fsdp = report["fsdp"]
  for opt in OPTIMIZERS:
    assert fsdp[f"Auto/{opt}"]["collectives"] == {}, opt
  assert fsdp["Explicit/pytorch"]["collectives"] == {}
  # The count can see communication: a global-norm clip needs an all-reduce.
  for axes in ("Auto", "Explicit"):
    assert fsdp[f"{axes}/control_clip_by_global_norm"]["collectives"].get(
        "all-reduce", 0
    ) >= 1


def test_apply_step_on_shards_has_no_collectives(eight_devices):
  report, _ = eight_devices
  fsdp = report["fsdp"]
  for opt in ("pytorch", "optax_bfloat16", "amsgradw", "paper_b1_schedule"):
    assert fsdp[f"Auto/{opt}"]["apply_step_collectives"] == {}, opt
    # Stochastic rounding of a shard needs the elements' global positions,
    # which the handler does not know: those shards round in XLA.
    assert fsdp[f"Auto/{opt}"]["apply_step_one_pass"] == (opt != "optax_bfloat16"), opt
  assert fsdp["Explicit/pytorch"]["apply_step_collectives"] == {}


def test_sharded_rounding_follows_global_positions(eight_devices):
  report, _ = eight_devices
  results = report["sharded_rounding"]
  # Same path on both sides: bit-identical, bfloat16 rounding included.
  assert results["xla/bfloat16_stochastic"]["differ"] == 0
  assert results["xla/float32"]["differ"] == 0
  assert results["default/float32"]["differ"] == 0
  # Handler on one device, XLA on the shards: a rare flipped decision.
  entry = results["default/bfloat16_stochastic"]
  assert entry["differ"] <= 1e-3 * entry["total"]


def test_fully_sharded_state_is_split_evenly(eight_devices):
  report, _ = eight_devices
  entry = report["fsdp"]["Auto/pytorch"]
  # mu, nu and nu_max: three float32 copies of the params, an eighth per device.
  assert entry["state_bytes_total"] == 3 * entry["param_bytes_total"]
  assert set(entry["state_bytes_per_device"].values()) == {
      entry["state_bytes_total"] // 8
  }


def test_data_parallel_example_matches_single_device(eight_devices):
  report, out = eight_devices
  facts = report["data_parallel"]
  single = dict(np.load(out / "params_single.npz"))
  for layout in ("replicated", "fsdp"):
    sharded = dict(np.load(out / f"params_{layout}.npz"))
    assert {a.dtype for a in sharded.values()} == {np.dtype(np.float32)}
    # Eight devices sum the batch gradient in another order; over 100 steps
    # that float32 round-off grows to a few 1e-5 (measured 3.5e-5), as much as
    # reordering the rows of every batch on one device does (up to 2.2e-5).
    assert relative_difference(sharded, single) <= 1e-4, layout
    assert facts[layout]["state_sharded_like_params"], layout
    assert facts[layout]["loss"] < 0.5 * facts[layout]["first_loss"], layout
  # Data parallel for real: the gradient is all-reduced across devices, and
  # with FSDP each device holds about an eighth of the state.
  assert facts["single"]["collectives"] == {}
  assert facts["replicated"]["collectives"].get("all-reduce", 0) >= 1
  total = facts["fsdp"]["state_bytes_total"]
  assert facts["replicated"]["state_bytes_per_device"] == total
  assert facts["fsdp"]["state_bytes_per_device"] < total / 8 + 64



# ----------------------------------------------------------------------------
# 8-bit state (mu_dtype and nu_dtype "int8").
# ----------------------------------------------------------------------------

INT8_EIGHT_BIT = ["embedding", "kernel", "stacked", "vector"]  # "bias" stays float32


def test_int8_state_is_sharded_like_its_params(eight_devices):
  report, _ = eight_devices
  for axes in ("Auto", "Explicit"):
    entry = report["int8"][f"{axes}/fsdp"]
    # The 8-bit leaves are the large ones, in every buffer.
    assert entry["eight_bit"] == {b: INT8_EIGHT_BIT for b in ("mu", "nu", "nu_max")}, axes
    # Codes and block exponents on the param's sharding, from an eager and a
    # jitted init and after three steps.
    for way in ("placement/eager", "placement/jit", "placement/after_steps"):
      assert entry[way] == [], (axes, way)
    assert entry["loop_compiles"] == 1, axes


def test_int8_fully_sharded_step_has_no_collectives(eight_devices):
  report, _ = eight_devices
  for axes in ("Auto", "Explicit"):
    entry = report["int8"][f"{axes}/fsdp"]
    assert entry["collectives"] == {}, axes
    assert entry["apply_step_collectives"] == {}, axes
  # The count sees block scales that need communication: shards of 128
  # elements along the last axis cut the 256-element blocks in two.
  control = report["int8"]["Auto/straddling"]
  assert control["eight_bit"]["nu_max"] == ["straddling"]
  assert sum(control["collectives"].values()) >= 1
  assert sum(control["apply_step_collectives"].values()) >= 1


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_int8_sharded_state_is_bit_identical_to_one_device(eight_devices, rounding):
  report, _ = eight_devices
  entry = report["int8"][f"identical/{rounding}"]
  expected = {f"{name}/{buffer}/{part}"
              for name in INT8_EIGHT_BIT for buffer in ("mu", "nu", "nu_max")
              for part in ("codes", "exponents")}
  expected |= {f"bias/{buffer}/value" for buffer in ("mu", "nu", "nu_max")}
  expected |= {f"params/{name}" for name in [*INT8_EIGHT_BIT, "bias"]}
  assert set(entry["differ"]) == expected
  # Five steps: codes and block exponents, params too, equal bit for bit.
  assert {k: n for k, n in entry["differ"].items() if n} == {}
  # Not a trivial state: each moment's codes take many values.
  assert min(entry["distinct_codes"].values()) >= 8
