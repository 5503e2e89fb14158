"""Saving and restoring optimizer state with Orbax, checked before restoring,
and kept through a kill.

Orbax restores a checkpoint into whatever structure it is given and casts each
array to the dtype it is asked for: a float32 ``mu`` read into a bfloat16
target comes back silently rounded, and a mismatched shape fails without
saying which leaf. :func:`restore` and :meth:`Manager.restore` compare the
checkpoint's metadata with the target first and raise one error listing every
difference by its path.

Two ways to save:

* :func:`save` and :func:`restore`: one checkpoint at one path.
  ``save(path, tree, force=True)`` replaces it without a moment in which no
  complete checkpoint is there.
* :class:`Manager`: the checkpoints of a training run, one per saved step, in
  one directory. It saves every ``save_interval_steps`` steps, keeps the
  latest ``max_to_keep``, and finds the latest complete one to resume from.

A process killed while saving (a preempted machine, an out-of-memory kill)
loses at most that save: neither way removes the previous checkpoint before
the new one is complete and in place.

Paths. Every directory argument takes a ``str``, a ``pathlib.Path`` or an
``etils.epath.Path``, local or a URI that Orbax takes (``gs://bucket/dir``);
a relative path is taken from the working directory. Every operation on paths
here goes through ``etils.epath``, as Orbax's own do. Which checkpoint is
complete follows Orbax's rule for the path:

* ``gs://``: Google Cloud Storage has no atomic rename, so Orbax writes a
  checkpoint in place and writes ``commit_success.txt`` into it last; a
  directory without that file is an interrupted save. ``save(force=True)``
  deletes the old checkpoint's ``commit_success.txt`` first and copies the
  new one into place object by object with ``commit_success.txt`` last, so a
  kill at any moment leaves one complete checkpoint that :func:`restore`
  reads.
* every other path: Orbax writes a checkpoint into a temporary folder
  (``<name>.orbax-checkpoint-tmp...``) and renames it into place once it is
  complete, and ``save(force=True)`` swaps with two renames. Both (Orbax's
  and ours) assume that the filesystem renames a directory atomically, as a
  local POSIX filesystem does. Where a rename is a copy and a delete (an
  object store other than ``gs://``, such as ``s3://`` through fsspec), a
  kill can leave a partial directory that passes for a checkpoint: such
  paths are not covered.

What is tested: the local filesystem with ``str``, ``pathlib.Path`` and
``epath.Path``, Orbax writing (also killed with SIGKILL); and ``gs://`` through
epath's fsspec backend onto fsspec's in-memory filesystem, which copies and
deletes object by object, with a stand-in for Orbax's write there (Orbax writes
arrays with TensorStore, whose ``gs://`` driver talks to Google Cloud Storage
itself, not to fsspec), the replacement stopped at every single operation.
Orbax's own writes to a real bucket are not tested here.

Several processes (multi-host). Every process of the job calls :func:`save`,
:func:`restore` and the :class:`Manager` methods with the same path, as Orbax
requires; Orbax writes each process's shards and its first process writes the
metadata and marks the checkpoint complete. It is assumed that all processes
see one filesystem at that path (a bucket, or a shared NFS or Lustre mount, not
a local disk per host), and that what one process wrote, renamed or deleted
before a barrier is seen by every process after it. The first process alone
finishes what a killed save left beside the path, swaps a replaced
checkpoint in and deletes the old one; the others wait for it at a barrier.
Whether there is a checkpoint to replace is the first process's view, sent
to all, so that every process takes the same branch around Orbax's
collective calls. :func:`restore` reads without a barrier: do not restore
from a path while a save to it is running.

Needs ``orbax-checkpoint`` (``pip install optax-amsgrad[checkpoint]``).
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any

import jax
import numpy as np

try:
  from etils import epath
except ImportError as error:  # pragma: no cover - depends on the install
  raise ImportError(
      "optax_amsgrad.checkpoint needs orbax-checkpoint (and etils, which it "
      "brings): pip install 'optax-amsgrad[checkpoint]'"
  ) from error

from optax_amsgrad import _blockwise, _placement

__all__ = [
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "Manager",
    "restore",
    "save",
]

# Orbax writes a checkpoint into a folder named like the final one plus this
# suffix (and, in some versions, a timestamp), then renames it into place.
_ORBAX_TMP = ".orbax-checkpoint-tmp"
# ``save(path, tree, force=True)`` onto a checkpoint writes the new one at
# ``path + _NEW`` (Orbax renames it there once it is complete), renames the
# old one to ``path + _OLD``, the new one to ``path``, and deletes the old.
_NEW = ".orbax-amsgrad-new"
_OLD = ".orbax-amsgrad-old"
# What Orbax writes last into a checkpoint on ``gs://`` to mark it complete.
_COMMIT_FILE = "commit_success.txt"


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree, shapes or dtypes differ from the target's.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from optax_amsgrad import checkpoint
    >>> directory = tempfile.TemporaryDirectory()
    >>> checkpoint.save(directory.name + "/w", {"w": jnp.ones(3)})
    >>> try:
    ...   checkpoint.restore(directory.name + "/w", {"w": jnp.ones(4)})
    ... except checkpoint.CheckpointMismatchError as error:
    ...   print(str(error).splitlines()[1])
      ['w']: shape (3,) in the checkpoint, (4,) in the target
    >>> directory.cleanup()
  """


class CheckpointNotFoundError(FileNotFoundError):
  """No complete checkpoint where one was asked for. The message names the
  path and says what is there: nothing, an interrupted save, a directory
  without a checkpoint, or (for :meth:`Manager.restore`) the steps there are.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from optax_amsgrad import checkpoint
    >>> directory = tempfile.TemporaryDirectory()
    >>> try:
    ...   checkpoint.restore(directory.name + "/none", {"w": jnp.ones(3)})
    ... except FileNotFoundError as error:
    ...   print(type(error).__name__)
    CheckpointNotFoundError
    >>> directory.cleanup()
  """


def _orbax() -> Any:
  try:
    import orbax.checkpoint as ocp
  except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "optax_amsgrad.checkpoint needs orbax-checkpoint: pip install "
        "'optax-amsgrad[checkpoint]'"
    ) from error
  return ocp


def _sync(name: str) -> None:
  """Waits until every process of the job gets here."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _agreed(flag: bool) -> bool:
  """The first process's ``flag``, on every process, so that all of them take
  the same branch around Orbax's collective calls."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _as_path(directory: str | os.PathLike[str]) -> epath.Path:
  """``directory`` as an absolute ``epath.Path``, the type Orbax uses: a
  local path or a URI such as ``gs://bucket/dir``."""
  path = epath.Path(directory)
  return path if path.is_absolute() else path.absolute()


def _beside(path: epath.Path, suffix: str) -> epath.Path:
  return path.parent / (path.name + suffix)


def _commits_with_a_file(path: epath.Path) -> bool:
  """Whether Orbax marks a checkpoint at ``path`` complete with a commit file
  rather than by renaming it into place: on Google Cloud Storage, which has
  no atomic rename of a directory."""
  return str(path).startswith("gs://")


def _finalized(path: epath.Path) -> bool:
  """Whether ``path`` holds a checkpoint Orbax finished writing, by Orbax's own
  rule: a directory not named as its temporary folder, holding
  ``commit_success.txt`` on ``gs://``."""
  if _ORBAX_TMP in path.name or not path.is_dir():
    return False
  return not _commits_with_a_file(path) or (path / _COMMIT_FILE).exists()


def _move(source: epath.Path, target: epath.Path) -> None:
  """Moves the complete checkpoint at ``source`` to the free ``target`` so
  that a kill at any moment leaves one of them complete."""
  if not _commits_with_a_file(source):
    source.rename(target)
    return
  # A rename there copies and deletes object by object, in no set order.
  # The commit file, copied last and deleted first, marks which of the two
  # directories is complete at each moment.
  files = sorted(_files(source), key=lambda file: file == _COMMIT_FILE)
  for file in files:  # objects need no parent directory made first
    (source / file).copy(target / file)
  _delete(source)


def _files(directory: epath.Path) -> list[str]:
  """The files under ``directory``, as paths relative to it."""
  files: list[str] = []
  for entry in directory.iterdir():
    if entry.is_dir():
      files.extend(f"{entry.name}/{file}" for file in _files(entry))
    else:
      files.append(entry.name)
  return files


def _delete(path: epath.Path) -> None:
  """Deletes the checkpoint at ``path``, its commit file first, so that what
  a kill leaves of it does not pass for a checkpoint."""
  if _commits_with_a_file(path):
    (path / _COMMIT_FILE).unlink(missing_ok=True)
  path.rmtree(missing_ok=True)


def _replaced(path: epath.Path) -> bool:
  """Whether a replacement of the checkpoint at ``path`` was stopped after
  the old one was taken away and before the new one, complete beside it, was
  in place: then the new one is the checkpoint of ``path``."""
  if _finalized(path) or not _finalized(_beside(path, _NEW)):
    return False
  # On gs://, ``path`` may hold what a kill left of the old checkpoint or of
  # a copy of the new; elsewhere the old one is renamed away whole.
  return _commits_with_a_file(path) or not path.exists()


def _swap(path: epath.Path) -> None:
  """Puts the complete new checkpoint beside ``path`` in its place."""
  new = _beside(path, _NEW)
  if _commits_with_a_file(path):
    # The old one stops being a checkpoint when its commit file goes; from
    # then until the copy's commit file is written, the new one is read.
    _delete(path)
    _move(new, path)
  else:
    old = _beside(path, _OLD)
    path.rename(old)
    new.rename(path)
    old.rmtree()


def _settle(path: epath.Path) -> None:
  """Finishes what a replacement of the checkpoint at ``path`` left when its
  process was killed, so that ``path`` holds the complete checkpoint that
  :func:`restore` reads: the new one moves into place if ``path`` holds none,
  and once ``path`` holds one, the leftovers beside it go. Run by the first
  process only."""
  if _replaced(path):
    path.rmtree(missing_ok=True)
    _move(_beside(path, _NEW), path)
  if not _finalized(path):
    return
  old = _beside(path, _OLD)
  if old.exists():
    old.rmtree()
  for entry in path.parent.iterdir():
    if entry.name.startswith(path.name + _NEW):
      with contextlib.suppress(OSError):
        entry.rmtree()


def _write(path: epath.Path, tree: Any, *, force: bool) -> None:
  checkpointer = _orbax().StandardCheckpointer()
  try:
    checkpointer.save(path, tree, force=force)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def save(directory: str | os.PathLike[str], tree: Any, *, force: bool = False) -> None:
  """Writes ``tree`` (optimizer state, params, or a dict of both) to
  ``directory`` with Orbax and waits until it is on disk.

  Sharded arrays are written shard by shard. In a job of several processes,
  call it on every process, as Orbax requires.

  A process killed while saving leaves the previous checkpoint restorable.
  With ``force=True`` onto an existing checkpoint, the new one is written
  completely beside it (at ``<directory>.orbax-amsgrad-new``) before the old
  one goes: the old one is renamed to ``<directory>.orbax-amsgrad-old``, the
  new one to ``directory``, and the old one is deleted. If the process is
  killed between the two renames, :func:`restore` reads the complete new
  checkpoint beside the missing ``directory``, and the next :func:`save` to
  ``directory`` moves it into place. On ``gs://`` the old one is deleted in
  place, ``commit_success.txt`` first, and the new one is copied to
  ``directory`` with ``commit_success.txt`` last; until that file is there,
  :func:`restore` reads the new one beside it (see the module's notes on
  paths). To keep several checkpoints of a run and resume from the latest,
  use :class:`Manager`.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax_amsgrad
    >>> from optax_amsgrad import checkpoint
    >>> state = optax_amsgrad.amsgrad(learning_rate=0.1).init({"w": jnp.ones(3)})
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   checkpoint.save(directory + "/state", state)
    ...   checkpoint.save(directory + "/state", state, force=True)  # replaces it

  Args:
    directory: the checkpoint's directory (``str``, ``pathlib.Path`` or
      ``etils.epath.Path``, local or ``gs://``); it must not exist unless
      ``force``.
    tree: a pytree of arrays.
    force: replace an existing checkpoint.
  """
  path = _as_path(directory)
  if jax.process_index() == 0:
    _settle(path)
  _sync(f"optax_amsgrad.checkpoint.save:settled:{path}")
  if not (force and _agreed(path.exists())):
    _write(path, tree, force=force)
    return
  _write(_beside(path, _NEW), tree, force=True)
  if jax.process_index() == 0:
    _swap(path)
  _sync(f"optax_amsgrad.checkpoint.save:replaced:{path}")


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
  problems = _storage_differences(stored, wanted)
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


_BLOCK_FIELDS = _blockwise.Quantized._fields


def _storage_differences(stored: dict[Any, Any], wanted: dict[Any, Any]) -> list[str]:
  """Each moment stored in 8-bit blocks (``mu_dtype``/``nu_dtype="int8"``:
  a codes and an exponents leaf under its path) on one side and as one array
  on the other, named once by its path; the leaves so named are taken out
  of ``stored`` (metadata by path tokens) and ``wanted`` (``(name,
  abstract leaf)`` by path tokens)."""
  codes_field, exponents_field = _BLOCK_FIELDS

  def blocks(tokens: Any) -> set[Any]:
    return {t[:-1] for t in tokens
            if t[-1:] == (codes_field,) and (*t[:-1], exponents_field) in tokens}

  def array(leaf: Any) -> str:
    return f"an array of {np.dtype(leaf.dtype)} {tuple(leaf.shape)}"

  def in_blocks(codes: Any, exponents: Any) -> str:
    return (f"8-bit blocks (int8 storage: {np.dtype(codes.dtype)} codes {tuple(codes.shape)}, "
            f"{np.dtype(exponents.dtype)} exponents {tuple(exponents.shape)})")

  problems = []
  for prefix in sorted(blocks(stored) & wanted.keys()):
    name, leaf = wanted.pop(prefix)
    codes, exponents = (stored.pop((*prefix, field)) for field in _BLOCK_FIELDS)
    problems.append(f"{name}: {in_blocks(codes, exponents)} in the checkpoint, "
                    f"{array(leaf)} in the target")
  for prefix in sorted(blocks(wanted) & stored.keys()):
    (name, codes), (_, exponents) = (wanted.pop((*prefix, field)) for field in _BLOCK_FIELDS)
    problems.append(f"{name.removesuffix('.' + codes_field)}: {array(stored.pop(prefix))} in "
                    f"the checkpoint, {in_blocks(codes, exponents)} in the target")
  return problems


def _abstract_target(target: Any) -> Any:
  """The target as ``jax.ShapeDtypeStruct`` leaves, with the shardings that
  restored arrays get."""
  # Leaves not committed to a device (the step count of a state made by an
  # eager init) go where the committed leaves are: Orbax would commit them to
  # the first device, which jit refuses to mix with arrays sharded over a mesh.
  uncommitted = _placement.scalar_sharding(target)
  return jax.tree.map(lambda leaf: _abstract(leaf, uncommitted), target)


def _check(metadata: Any, abstract: Any, what: str) -> None:
  """Raises CheckpointMismatchError listing every difference between the
  checkpoint's tree metadata and the abstract target."""
  problems = _differences(metadata, abstract)
  if problems:
    shown = "\n".join(f"  {p}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointMismatchError(
        f"{what} does not match the target "
        f"({len(problems)} difference{'s' if len(problems) > 1 else ''}):\n"
        f"{shown}{more}\n"
        "Was it saved by an optimizer with other options (convention, "
        "mu_dtype, nu_dtype, inject_hyperparams), or for other params?"
    )


def _listing(entries: list[str], most: int = 5) -> str:
  shown = ", ".join(entries[:most])
  return shown + (f", ... ({len(entries)} in all)" if len(entries) > most else "")


def _step_directories(directory: epath.Path) -> list[int]:
  """The steps of a :class:`Manager`'s complete checkpoints in ``directory``."""
  try:
    entries = list(directory.iterdir())
  except OSError:
    return []
  return sorted(int(entry.name) for entry in entries if entry.name.isdigit() and _finalized(entry))


def _what_is_at(path: epath.Path) -> str:
  """What is at ``path`` (and beside it), for an error saying that it holds
  no checkpoint."""
  if path.is_dir():
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
      return "an empty directory"
    steps = _step_directories(path)
    if steps:
      return (
          f"the directory of a Manager, with checkpoints of steps {steps}; "
          f"read them with Manager({str(path)!r}).restore(step, target)"
      )
    if _commits_with_a_file(path) and "_CHECKPOINT_METADATA" in entries:
      return (
          f"an interrupted save (it holds {_listing(entries)} but no {_COMMIT_FILE}): "
          "the process writing it stopped before the checkpoint was complete"
      )
    return f"a directory without an Orbax checkpoint in it (it holds {_listing(entries)})"
  if path.exists():
    return "a file, not a checkpoint's directory"
  parent, name = path.parent, path.name
  if not parent.is_dir():
    return f"nothing: {parent} does not exist"
  interrupted = sorted(
      entry.name
      for entry in parent.iterdir()
      if entry.name.startswith(name + ".") and _ORBAX_TMP in entry.name
  )
  if interrupted:
    return (
        f"nothing but an interrupted save ({_listing(interrupted)} in {parent}): "
        "the process writing it stopped before the checkpoint was complete"
    )
  if _beside(path, _OLD).is_dir():
    return f"nothing but a replaced checkpoint being deleted ({name + _OLD} in {parent})"
  return "nothing"


def _complete(path: epath.Path) -> epath.Path:
  """Where the complete checkpoint saved to ``path`` is: ``path``, or the new
  checkpoint beside it when a replacement was stopped between taking the old
  one away and putting the new one in place."""
  return _beside(path, _NEW) if _replaced(path) else path


def restore(directory: str | os.PathLike[str], target: Any) -> Any:
  """Reads a checkpoint written by :func:`save` (or Orbax's
  ``StandardCheckpointer``) into the structure, dtypes and shardings of
  ``target``, after checking that they match the checkpoint.

  If a :func:`save` with ``force=True`` was killed while it swapped the new
  checkpoint in, ``directory`` is missing and the complete new checkpoint is
  beside it (``<directory>.orbax-amsgrad-new``): that one is read.

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
    >>> try:
    ...   checkpoint.restore(directory.name + "/other", state)
    ... except checkpoint.CheckpointNotFoundError as error:
    ...   print(str(error).replace(directory.name, "/tmp/d"))
    No checkpoint at /tmp/d/other: nothing.
    >>> directory.cleanup()

  Args:
    directory: the checkpoint's directory (``str``, ``pathlib.Path`` or
      ``etils.epath.Path``, local or ``gs://``).
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
    CheckpointNotFoundError: when there is no complete checkpoint at
      ``directory``; the message says what is there (nothing, an interrupted
      save, a directory without a checkpoint, a :class:`Manager`'s directory).
    CheckpointMismatchError: when a leaf is missing on either side or differs
      in shape or dtype; the message lists each one by its path. A moment
      stored in 8-bit blocks (``mu_dtype``/``nu_dtype="int8"``) on one side
      and as one array on the other is named once, with both formats.
  """
  ocp = _orbax()
  path = _as_path(directory)
  found = _complete(path)
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(found).item_metadata if _finalized(found) else None
    if metadata is None:
      raise CheckpointNotFoundError(f"No checkpoint at {path}: {_what_is_at(path)}.")
    abstract = _abstract_target(target)
    _check(metadata.tree, abstract, f"The checkpoint at {found}")
    return checkpointer.restore(found, abstract)
  finally:
    checkpointer.close()


class Manager:
  """The checkpoints of one training run, one per saved step, in one
  directory: Orbax's ``CheckpointManager`` with the checks of :func:`restore`.

  :meth:`save` is called every step and saves every ``save_interval_steps``
  steps; the latest ``max_to_keep`` checkpoints are kept. A checkpoint is
  complete once Orbax renames it from ``<step>.orbax-checkpoint-tmp`` to
  ``<step>``; a process killed while saving leaves the earlier ones, and a
  restarted run resumes from :meth:`latest_step`, losing at most the steps
  since that checkpoint. In a job of several processes, every process creates
  the manager and calls :meth:`save` and :meth:`restore`, as Orbax requires.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax_amsgrad
    >>> from optax_amsgrad import checkpoint
    >>> solver = optax_amsgrad.amsgrad(learning_rate=0.1)
    >>> params = {"w": jnp.ones(3)}
    >>> state = solver.init(params)
    >>> directory = tempfile.TemporaryDirectory()
    >>> with checkpoint.Manager(directory.name, save_interval_steps=10) as manager:
    ...   for step in range(1, 26):
    ...     # ... one training step, then:
    ...     saved = manager.save(step, {"params": params, "opt_state": state})
    ...   print(manager.all_steps(), manager.latest_step())
    [10, 20] 20
    >>> # A restarted run: a fresh target, the latest step.
    >>> with checkpoint.Manager(directory.name, save_interval_steps=10) as manager:
    ...   step = manager.latest_step()
    ...   target = {"params": params, "opt_state": solver.init(params)}
    ...   restored = manager.restore(step, target)
    ...   try:
    ...     manager.restore(15, target)
    ...   except checkpoint.CheckpointNotFoundError as error:
    ...     print(str(error).replace(directory.name, "/tmp/d"))
    No checkpoint of step 15 in /tmp/d: it holds checkpoints of steps [10, 20].
    >>> directory.cleanup()

  Args:
    directory: the directory of the run's checkpoints (created if missing):
      ``str``, ``pathlib.Path`` or ``etils.epath.Path``, local or ``gs://``.
      It holds one folder per step; give each run its own.
    max_to_keep: how many of the latest checkpoints to keep (None: all).
    save_interval_steps: :meth:`save` writes the steps that are multiples of
      it.
    asynchronous: with True, :meth:`save` returns once the arrays are copied
      off the devices and writes them in a background thread (Orbax's
      asynchronous checkpointing); the next save, :meth:`wait_until_finished`
      and :meth:`close` wait for it. A kill then loses the save in progress
      too: at most the steps since the last completed save.
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      max_to_keep: int | None = 3,
      save_interval_steps: int = 1,
      asynchronous: bool = False,
  ) -> None:
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be at least 1 or None, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be at least 1, got {save_interval_steps}")
    ocp = _orbax()
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(max_to_keep),
        enable_async_checkpointing=asynchronous,
        # Interrupted saves of an earlier run go when the manager starts.
        cleanup_tmp_directories=True,
    )
    self._path = _as_path(directory)
    self._directory = str(self._path)
    self._manager = ocp.CheckpointManager(
        self._path,
        options=options,
        handler_registry=ocp.handlers.create_default_handler_registry(
            default=ocp.StandardCheckpointHandler()
        ),
    )

  @property
  def directory(self) -> str:
    """The absolute path of the directory of checkpoints."""
    return self._directory

  def save(self, step: int, tree: Any, *, force: bool = False) -> bool:
    """Saves ``tree`` as the checkpoint of ``step`` if ``step`` is a multiple
    of ``save_interval_steps`` (or ``force``) and later than the latest
    checkpoint; deletes the checkpoints beyond ``max_to_keep``.

    Args:
      step: the training step that ``tree`` is the state after.
      tree: a pytree of arrays (params, optimizer state, or a dict of both).
        With ``asynchronous``, it may be donated to the next step as soon as
        this returns.
      force: save even off the interval (the last step of a run, say). A step
        already saved is not overwritten: this returns False.

    Returns:
      Whether a checkpoint was saved (or, asynchronously, started).
    """
    ocp = _orbax()
    if force and step in self._manager.all_steps():
      return False
    return bool(self._manager.save(step, args=ocp.args.StandardSave(tree), force=force))

  def all_steps(self) -> list[int]:
    """The steps of the complete checkpoints, in increasing order. A step
    being saved asynchronously counts once its save completes; in a job of
    several processes, call :meth:`wait_until_finished` first, so that every
    process sees the same steps."""
    steps = self._manager.all_steps()
    return sorted(s for s in steps if _finalized(self._path / str(s)))

  def latest_step(self) -> int | None:
    """The step of the latest complete checkpoint, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, step: int | None, target: Any) -> Any:
    """Reads the checkpoint of ``step`` (None: the latest) into the
    structure, dtypes and shardings of ``target``, after the checks of
    :func:`restore`.

    Raises:
      CheckpointNotFoundError: when there is no checkpoint of ``step`` (or
        none at all); the message names the steps there are.
      CheckpointMismatchError: when the checkpoint does not match ``target``.
    """
    ocp = _orbax()
    self.wait_until_finished()
    steps = self.all_steps()
    if step is None and steps:
      step = steps[-1]
    if step is None or step not in steps:
      raise CheckpointNotFoundError(self._missing(step, steps))
    abstract = _abstract_target(target)
    metadata = self._manager.item_metadata(step)
    _check(metadata.tree, abstract, f"The checkpoint of step {step} in {self._directory}")
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def _missing(self, step: int | None, steps: list[int]) -> str:
    where = "No checkpoint" + (f" of step {step}" if step is not None else "")
    if steps:
      return f"{where} in {self._directory}: it holds checkpoints of steps {steps}."
    return f"{where} in {self._directory}: it holds no checkpoint."

  def wait_until_finished(self) -> None:
    """Waits until an asynchronous save in progress is complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a save in progress and releases Orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Manager:
    return self

  def __exit__(
      self,
      kind: type[BaseException] | None,
      error: BaseException | None,
      traceback: types.TracebackType | None,
  ) -> None:
    self.close()
