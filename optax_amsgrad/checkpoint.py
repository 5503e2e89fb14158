"""Saving and restoring optimizer state with Orbax, checked before restoring.

Orbax restores a checkpoint into whatever structure it is given and casts each
array to the dtype it is asked for: a float32 ``mu`` read into a bfloat16
target comes back silently rounded, and a mismatched shape fails without
saying which leaf. :func:`restore` compares the checkpoint's metadata with the
target first and raises one error listing every difference by its path.

Needs ``orbax-checkpoint`` (``pip install optax-amsgrad[checkpoint]``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

__all__ = ["CheckpointMismatchError", "restore", "save"]


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree, shapes or dtypes differ from the target's."""


def _orbax() -> Any:
  try:
    import orbax.checkpoint as ocp
  except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "optax_amsgrad.checkpoint needs orbax-checkpoint: pip install "
        "'optax-amsgrad[checkpoint]'"
    ) from error
  return ocp


def save(directory: str | os.PathLike[str], tree: Any, *, force: bool = False) -> None:
  """Writes ``tree`` (optimizer state, params, or a dict of both) to
  ``directory`` with Orbax and waits until it is on disk.

  Sharded arrays are written shard by shard. In a job of several processes,
  call it on every process, as Orbax requires.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax_amsgrad
    >>> from optax_amsgrad import checkpoint
    >>> state = optax_amsgrad.amsgrad(learning_rate=0.1).init({"w": jnp.ones(3)})
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   checkpoint.save(directory + "/state", state)

  Args:
    directory: the checkpoint's directory; it must not exist unless ``force``.
    tree: a pytree of arrays.
    force: overwrite an existing checkpoint.
  """
  checkpointer = _orbax().StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), tree, force=force)
  checkpointer.wait_until_finished()


def _path_tokens(path: tuple[Any, ...]) -> tuple[str, ...]:
  """Key path as strings, the same for a NamedTuple field and Orbax's dict key,
  a tuple index and Orbax's list index."""
  tokens = []
  for key in path:
    for attribute in ("name", "key", "idx"):
      if hasattr(key, attribute):
        tokens.append(str(getattr(key, attribute)))
        break
    else:
      tokens.append(str(key))
  return tuple(tokens)


def _abstract(leaf: Any, uncommitted: Any = None) -> jax.ShapeDtypeStruct:
  """The leaf's shape, dtype and sharding; ``uncommitted`` replaces the
  sharding of an array that is not committed to its device."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if not hasattr(leaf, "dtype"):
    leaf = np.asarray(leaf)
  sharding = getattr(leaf, "sharding", None)
  if uncommitted is not None and not getattr(leaf, "committed", True):
    sharding = uncommitted
  return jax.ShapeDtypeStruct(  # type: ignore[no-untyped-call]
      np.shape(leaf), leaf.dtype, sharding=sharding
  )


def _sharding_for_uncommitted(target: Any) -> Any:
  """Where to put restored leaves whose target was not committed to a device
  (the step count of a state made by an eager ``init``): Orbax would commit
  them to the first device, and jit refuses to mix that with arrays sharded
  over a mesh. They go where the committed leaves are: replicated over their
  mesh, or on their single device. None when those disagree."""
  shardings = [
      leaf.sharding
      for leaf in jax.tree.leaves(target)
      if isinstance(leaf, jax.Array) and leaf.committed
  ]
  if not shardings:
    return None
  named = [s for s in shardings if isinstance(s, jax.sharding.NamedSharding)]
  if len(named) == len(shardings):
    meshes = {s.mesh for s in named}
    if len(meshes) == 1:
      replicated = jax.sharding.PartitionSpec()  # type: ignore[no-untyped-call]
      return jax.sharding.NamedSharding(meshes.pop(), replicated)
    return None
  devices = {frozenset(s.device_set) for s in shardings}
  if len(devices) == 1 and len(next(iter(devices))) == 1:
    return jax.sharding.SingleDeviceSharding(next(iter(next(iter(devices)))))
  return None


def _differences(metadata: Any, target: Any) -> list[str]:
  """Every leaf that is missing on one side or differs in shape or dtype."""
  stored = {
      _path_tokens(path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]
  }
  wanted = {
      _path_tokens(path): (jax.tree_util.keystr(path), _abstract(leaf))
      for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  problems = []
  for tokens, (name, leaf) in wanted.items():
    if tokens not in stored:
      problems.append(f"{name}: in the target, not in the checkpoint")
      continue
    entry = stored[tokens]
    if tuple(entry.shape) != tuple(leaf.shape):
      problems.append(
          f"{name}: shape {tuple(entry.shape)} in the checkpoint, "
          f"{tuple(leaf.shape)} in the target"
      )
    if np.dtype(entry.dtype) != np.dtype(leaf.dtype):
      problems.append(
          f"{name}: dtype {np.dtype(entry.dtype)} in the checkpoint, "
          f"{np.dtype(leaf.dtype)} in the target"
      )
  for tokens in sorted(stored.keys() - wanted.keys()):
    problems.append(f"{'.'.join(tokens)}: in the checkpoint, not in the target")
  return problems


def restore(directory: str | os.PathLike[str], target: Any) -> Any:
  """Reads a checkpoint written by :func:`save` (or Orbax's
  ``StandardCheckpointer``) into the structure, dtypes and shardings of
  ``target``, after checking that they match the checkpoint.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax_amsgrad
    >>> from optax_amsgrad import checkpoint
    >>> solver = optax_amsgrad.amsgrad(learning_rate=0.1)
    >>> state = solver.init({"w": jnp.ones(3)})
    >>> directory = tempfile.TemporaryDirectory()
    >>> path = directory.name + "/state"
    >>> checkpoint.save(path, state)
    >>> restored = checkpoint.restore(path, solver.init({"w": jnp.zeros(3)}))
    >>> bool((restored[0].mu["w"] == state[0].mu["w"]).all())
    True
    >>> bf16 = optax_amsgrad.amsgrad(learning_rate=0.1, mu_dtype=jnp.bfloat16)
    >>> try:
    ...   checkpoint.restore(path, bf16.init({"w": jnp.zeros(3)}))
    ... except checkpoint.CheckpointMismatchError as error:
    ...   print(str(error).splitlines()[1])
      [0].mu['w']: dtype float32 in the checkpoint, bfloat16 in the target
    >>> directory.cleanup()

  Args:
    directory: the checkpoint's directory.
    target: a pytree like the one saved: for example ``optimizer.init(params)``
      for the same optimizer and params, or the same with
      ``jax.ShapeDtypeStruct`` leaves. Restored arrays take its leaves'
      shardings, so a checkpoint can be read onto another device layout.
      Leaves not committed to a device (the step count after an eager
      ``init``) are restored where the committed leaves are, replicated over
      their mesh.

  Returns:
    The restored pytree, with the structure of ``target``.

  Raises:
    CheckpointMismatchError: when a leaf is missing on either side or differs
      in shape or dtype; the message lists each one by its path.
  """
  ocp = _orbax()
  path = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  uncommitted = _sharding_for_uncommitted(target)
  abstract = jax.tree.map(lambda leaf: _abstract(leaf, uncommitted), target)
  problems = _differences(metadata, abstract)
  if problems:
    shown = "\n".join(f"  {p}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointMismatchError(
        f"The checkpoint at {path} does not match the target "
        f"({len(problems)} difference{'s' if len(problems) > 1 else ''}):\n"
        f"{shown}{more}\n"
        "Was it saved by an optimizer with other options (convention, "
        "mu_dtype, nu_dtype, inject_hyperparams), or for other params?"
    )
  return checkpointer.restore(path, abstract)
