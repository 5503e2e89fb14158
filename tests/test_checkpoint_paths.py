"""Checkpoint paths of every kind Orbax takes, through ``etils.epath``.

Orbax's own writes go through ``etils.epath`` (and TensorStore for arrays), so
it takes local paths, ``pathlib.Path``, ``epath.Path`` and URIs such as
``gs://bucket/dir``. The replacement in ``save(force=True)``, the cleanup of
what a killed one leaves and the listing of a Manager's steps must work on
each of them:

* ``str``, ``pathlib.Path`` and ``epath.Path`` (absolute and relative) with
  Orbax writing to the local filesystem;
* ``gs://`` through epath's fsspec backend onto fsspec's in-memory filesystem,
  a filesystem without an atomic rename (it copies and deletes object by
  object, as Google Cloud Storage does). Orbax's TensorStore writes to
  ``gs://`` go to the real Google Cloud Storage, which is not reachable in a
  test: there a stand-in for Orbax's write follows Orbax's protocol on
  ``gs://`` (files written in place, ``commit_success.txt`` last), and the
  tests check our own path logic, interrupted at every single filesystem
  operation.
"""

from __future__ import annotations

import contextlib
import itertools
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import testing as epath_testing
from fsspec.implementations.memory import MemoryFileSystem

from optax_amsgrad import checkpoint

PATH_TYPES: dict[str, Callable[[Any], Any]] = {
    "str": str,
    "pathlib.Path": pathlib.Path,
    "epath.Path": epath.Path,
}


def counted(i: int) -> dict[str, Any]:
  return {"count": jnp.asarray(i, jnp.int32), "x": jnp.full((8, 8), i, jnp.float32)}


def restored_count(path: Any) -> int:
  restored = checkpoint.restore(path, counted(-1))
  assert np.all(np.asarray(restored["x"]) == int(restored["count"]))
  return int(restored["count"])


@pytest.mark.parametrize("kind", sorted(PATH_TYPES))
def test_save_and_restore_take_every_path_type(tmp_path, kind):
  as_kind = PATH_TYPES[kind]
  path = as_kind(tmp_path / "ckpt")
  checkpoint.save(path, counted(1))
  checkpoint.save(path, counted(2), force=True)
  assert restored_count(path) == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
  with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
    checkpoint.restore(as_kind(tmp_path / "other"), counted(0))
  assert str(error.value) == f"No checkpoint at {tmp_path / 'other'}: nothing."


@pytest.mark.parametrize("kind", sorted(PATH_TYPES))
def test_relative_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch, kind):
  as_kind = PATH_TYPES[kind]
  monkeypatch.chdir(tmp_path)
  checkpoint.save(as_kind("ckpt"), counted(1))
  checkpoint.save(as_kind("ckpt"), counted(2), force=True)
  monkeypatch.chdir("/")
  assert restored_count(tmp_path / "ckpt") == 2
  with checkpoint.Manager(tmp_path / "run") as manager:
    manager.save(3, counted(3))
  monkeypatch.chdir(tmp_path)
  with checkpoint.Manager(as_kind("run")) as manager:
    assert manager.directory == str(tmp_path / "run")
    assert manager.all_steps() == [3]


@pytest.mark.parametrize("kind", sorted(PATH_TYPES))
def test_manager_takes_every_path_type(tmp_path, kind):
  directory = PATH_TYPES[kind](tmp_path / "run")
  with checkpoint.Manager(directory, save_interval_steps=2, max_to_keep=2) as manager:
    assert manager.directory == str(tmp_path / "run")
    for t in range(1, 7):
      manager.save(t, counted(t))
    assert manager.all_steps() == [4, 6]
  with checkpoint.Manager(directory) as manager:
    restored = manager.restore(None, counted(0))
  assert int(restored["count"]) == 6
  with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
    checkpoint.restore(directory, counted(0))
  assert str(error.value).endswith(
      f"the directory of a Manager, with checkpoints of steps [4, 6]; read them with "
      f"Manager('{tmp_path / 'run'}').restore(step, target)."
  )


# --- gs:// on an in-memory filesystem ----------------------------------------


class Killed(Exception):
  """Stands for a SIGKILL: raised in place of a filesystem operation."""


class Operations:
  """Counts the operations that change a filesystem and raises Killed in
  place of the ``kill_at``-th one."""

  def __init__(self) -> None:
    self.done = 0
    self.kill_at: int | None = None

  def __call__(self, name: str, path: Any) -> None:
    if self.kill_at is not None and self.done + 1 >= self.kill_at:
      raise Killed(f"killed instead of {name} {path}")
    self.done += 1


@pytest.fixture
def gcs(monkeypatch) -> Iterator[Operations]:
  """``gs://`` paths through epath's fsspec backend onto a fresh in-memory
  filesystem that counts (and can refuse) each object written, copied or
  deleted."""
  operations = Operations()

  class InMemoryGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict[str, Any] = {}  # noqa: RUF012 - one store per fixture
    pseudo_dirs = [""]  # noqa: RUF012

    def __init__(self, *args: Any, finalize_on_close: bool = True, **kwargs: Any) -> None:
      del finalize_on_close  # gcsfs's option, which epath passes
      super().__init__(*args, **kwargs)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
      if mode != "rb":
        operations("write", path)
      return super()._open(path, mode, *args, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
      operations("copy", path1)
      super().cp_file(path1, path2, **kwargs)

    def rm_file(self, path: str) -> None:
      operations("delete", path)
      super().rm_file(path)

  filesystem = InMemoryGCS(skip_instance_cache=True)
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: filesystem)
  assert epath.Path("gs://bucket")._backend is epath_backend.fsspec_backend
  yield operations


def write_like_orbax(path: epath.Path, tree: dict[str, Any], *, force: bool) -> None:
  """Orbax's StandardCheckpointer.save, in the shape of its files: on gs://
  written in place with commit_success.txt last, elsewhere into a temporary
  folder renamed into place."""
  if path.exists():
    if not force:
      raise ValueError(f"Destination {path} already exists.")
    path.rmtree()
  final = str(path).startswith("gs://")
  where = path if final else path.parent / (path.name + ".orbax-checkpoint-tmp-1")
  where.mkdir(parents=True)
  (where / "_CHECKPOINT_METADATA").write_text("{}")
  for name, leaf in tree.items():
    (where / "items").mkdir(exist_ok=True)
    (where / "items" / name).write_text(str(int(np.asarray(leaf).flat[0])))
  if final:
    (where / "commit_success.txt").write_text("")
  else:
    where.rename(path)


def count_at(path: epath.Path) -> int:
  """The count of the complete checkpoint found for ``path``, as restore
  finds it."""
  found = checkpoint._complete(path)
  assert checkpoint._finalized(found), f"no complete checkpoint for {path}"
  counts = {(found / "items" / name).read_text() for name in ("count", "x")}
  assert len(counts) == 1, (found, counts)
  return int(counts.pop())


def beside(path: epath.Path) -> list[str]:
  return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))


def test_orbax_finalized_rule_on_gcs(gcs):
  root = epath.Path("gs://bucket/run")
  write_like_orbax(root / "ckpt", counted(1), force=False)
  assert checkpoint._finalized(root / "ckpt")
  (root / "ckpt" / "commit_success.txt").unlink()
  assert not checkpoint._finalized(root / "ckpt")
  assert not checkpoint._finalized(root / "missing")


def test_force_save_replaces_a_checkpoint_on_gcs(gcs, monkeypatch):
  monkeypatch.setattr(checkpoint, "_write", write_like_orbax)
  path = epath.Path("gs://bucket/run/ckpt")
  checkpoint.save("gs://bucket/run/ckpt", counted(1))
  with pytest.raises(ValueError, match="already exists"):
    checkpoint.save(path, counted(2))
  checkpoint.save(path, counted(2), force=True)
  assert count_at(path) == 2
  assert beside(path) == []
  assert checkpoint._complete(path) == path


@contextlib.contextmanager
def counting_local_operations(operations: Operations) -> Iterator[None]:
  """The local filesystem, counting (and refusing) each rename, deletion,
  directory made and file written through epath."""

  def hook(name: str) -> Callable[..., Any]:
    def run(original: Callable[..., Any], path: Any, *args: Any, **kwargs: Any) -> Any:
      if name != "open" or args[0] != "r":
        operations(name, path)
      return original(path, *args, **kwargs)

    return run

  names = ("rename", "replace", "rmtree", "remove", "mkdir", "makedirs", "copy", "open")
  with epath_testing.mock_epath(**{name: hook(name) for name in names}):
    yield


def killed_force_save(path: epath.Path, operations: Operations, kill_at: int) -> bool:
  """save(path, count 2, force=True) over count 1, stopped in place of its
  ``kill_at``-th filesystem operation; returns whether it was stopped."""
  operations.kill_at = None
  operations.done = 0
  operations.kill_at = kill_at
  try:
    checkpoint.save(path, counted(2), force=True)
  except Killed:
    return True
  finally:
    operations.kill_at = None
  return False


@pytest.mark.parametrize("where", ["gs", "local"])
def test_force_save_killed_at_every_operation_never_loses_the_checkpoint(
    gcs, tmp_path, monkeypatch, where
):
  # One trial per filesystem operation of the save: stopped in its place,
  # the path still gives a complete checkpoint, the old or the new one, and
  # the next save puts its own in place and leaves nothing beside it.
  monkeypatch.setattr(checkpoint, "_write", write_like_orbax)
  found = []
  for kill_at in itertools.count(1):
    root = epath.Path(f"gs://bucket/trial{kill_at}") if where == "gs" else epath.Path(tmp_path)
    path = root / f"ckpt{kill_at}"
    context = counting_local_operations(gcs) if where == "local" else contextlib.nullcontext()
    with context:
      checkpoint.save(path, counted(1))
      if not killed_force_save(path, gcs, kill_at):
        break
      found.append(count_at(path))
      checkpoint.save(path, counted(3), force=True)
    assert count_at(path) == 3, kill_at
    assert checkpoint._complete(path) == path
    assert beside(path) == [], kill_at
  # Every operation of the last, complete save was a place to stop.
  assert len(found) == kill_at - 1 >= 8
  # Stopped early, the old checkpoint is read; stopped late, the new one.
  assert found[0] == 1 and found[-1] == 2
  assert found == sorted(found)


def test_step_listing_and_missing_checkpoints_on_gcs(gcs):
  run = epath.Path("gs://bucket/run")
  write_like_orbax(run / "4", counted(4), force=False)
  write_like_orbax(run / "8", counted(8), force=False)
  # A step killed while it was written: no commit_success.txt.
  write_like_orbax(run / "12", counted(12), force=False)
  (run / "12" / "commit_success.txt").unlink()
  assert checkpoint._step_directories(run) == [4, 8]
  with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
    checkpoint.restore("gs://bucket/run", counted(0))
  assert str(error.value) == (
      "No checkpoint at gs://bucket/run: the directory of a Manager, with "
      "checkpoints of steps [4, 8]; read them with "
      "Manager('gs://bucket/run').restore(step, target)."
  )
  with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
    checkpoint.restore(run / "12", counted(0))
  assert str(error.value) == (
      "No checkpoint at gs://bucket/run/12: an interrupted save (it holds "
      "_CHECKPOINT_METADATA, items but no commit_success.txt): the process "
      "writing it stopped before the checkpoint was complete."
  )
  with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
    checkpoint.restore(epath.Path("gs://bucket/run/16"), counted(0))
  assert str(error.value) == "No checkpoint at gs://bucket/run/16: nothing."
