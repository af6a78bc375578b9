"""What a stage read: the config fields (with their values) and the input files (by
content), recorded while the stage runs. The engine compares exactly this record on a
rerun, a resume and a sweep's sharing, so a stage cannot depend on a field or a file
without it being compared.

How the recording works:

* the stage gets the config as a :class:`Tracked` view: every leaf it reads (through any
  function it calls, in any thread of the process) is noted with its value in every
  :class:`Recorder` on the stack. A field read under a branch is recorded only when the
  branch runs; that is enough, as in build systems with dynamic dependencies: if a field's
  value changes the control flow, the first read that differs is already in the record.
  *Cosmetic* fields (log and checkpoint frequency, ...) are not recorded: they change no
  result by definition (``bssl.config.Field.cosmetic``).
* an input file or folder enters the record by what it contains
  (:func:`note_input`): its kind, its path and an identity that a rerun computes again.
* work done once and used by many stages (the recipe's data: D, U, ...) is made
  under a recorder of its own (a :class:`Memo`); every later use replays that record into
  the stage's, so the stage records what the cached object was made from.

A recorder is flushed (``flush``) whenever it gains an entry, before the value is
returned: partial state a stage writes afterwards is always covered by the record on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import ml_collections

from bssl import fileid, storage
from bssl.config.fields import all_fields
from bssl.config.names import ALL_STAGES

RECORD_VERSION = 2  # 1: fingerprints of declared sections (before 2026-12-03)
ABSENT = {"__absent__": True}  # the value noted for a field the config does not have

_lock = threading.RLock()
_stack: list[Recorder] = []


def plain(v):
  """A config value as plain JSON data (ConfigDicts and tuples as dicts and lists)."""
  if isinstance(v, ml_collections.ConfigDict):
    return {k: plain(v[k]) for k in sorted(v.keys())}
  if isinstance(v, dict):
    return {k: plain(v[k]) for k in sorted(v)}
  if isinstance(v, (list, tuple)):
    return [plain(x) for x in v]
  return json.loads(json.dumps(v, default=str))


class ChangedDuringStage(RuntimeError):
  """A field was read twice with different values (the config changed under a stage)."""


class Recorder:
  """The fields and inputs one stage (or one cached computation) read.

  ``fields``: {dotted name: JSON value}; ``files``: {key: {"kind", "path", "id"}}.
  ``flush(record)`` is called with :meth:`to_dict` after every new entry."""

  def __init__(self, initial: dict | None = None, flush: Callable[[dict], None] | None = None):
    self.fields: dict[str, Any] = dict((initial or {}).get("fields") or {})
    self.files: dict[str, dict] = dict((initial or {}).get("files") or {})
    self.flush = flush

  def to_dict(self) -> dict:
    return {"fields": dict(sorted(self.fields.items())), "files": dict(sorted(self.files.items()))}

  def _field(self, name: str, value) -> bool:
    if name in self.fields:
      if self.fields[name] != value:
        raise ChangedDuringStage(
            f"config field {name} was read as {self.fields[name]!r} and now as {value!r} "
            f"within one stage"
        )
      return False
    self.fields[name] = value
    return True

  def _file(self, key: str, entry: dict) -> bool:
    old = self.files.get(key)
    if old is not None:
      if old["id"] != entry["id"]:
        raise ChangedDuringStage(
            f"input {entry['path']} changed while a stage read it "
            f"({old['id']} -> {entry['id']})"
        )
      return False
    self.files[key] = dict(entry)
    return True

  def merge(self, other: Recorder | dict) -> bool:
    d = other.to_dict() if isinstance(other, Recorder) else other
    new = False
    for k, v in (d.get("fields") or {}).items():
      new |= self._field(k, v)
    for k, v in (d.get("files") or {}).items():
      new |= self._file(k, v)
    return new


def _notify(fn: Callable[[Recorder], bool]) -> None:
  with _lock:
    for r in list(_stack):
      if fn(r) and r.flush is not None:
        r.flush(r.to_dict())


@contextlib.contextmanager
def recording(rec: Recorder):
  """Everything read inside (in any thread) is noted in ``rec`` too."""
  with _lock:
    _stack.append(rec)
  try:
    yield rec
  finally:
    with _lock:
      _stack.remove(rec)


def active() -> bool:
  return bool(_stack)


def replay(rec: Recorder | dict) -> None:
  """Notes ``rec``'s entries in the active recorders (a cached object being used)."""
  if _stack:
    _notify(lambda r: r.merge(rec))


# --------------------------------------------------------------------------- config


_SCHEMA: dict[str, Any] | None = None


def _schema() -> dict:
  global _SCHEMA
  if _SCHEMA is None:
    _SCHEMA = {f.name: f for f in all_fields()}
  return _SCHEMA


def note_field(name: str, value) -> None:
  f = _schema().get(name)
  if f is not None and f.cosmetic:
    return
  v = value if value is ABSENT else plain(value)
  _notify(lambda r: r._field(name, v))


class Tracked:
  """A read-only view of a ConfigDict that notes every leaf read (see the module doc).
  Sections come back as views; schema fields (``model_kwargs`` included) and other leaves
  as their values. Passing a view to another process (pickling) counts as reading all of
  it."""

  __slots__ = ("_node", "_prefix")

  def __init__(self, node, prefix: str = ""):
    object.__setattr__(self, "_node", node)
    object.__setattr__(self, "_prefix", prefix)

  def _read(self, key: str):
    v = self._node[key]
    full = self._prefix + key
    if isinstance(v, ml_collections.ConfigDict) and full not in _schema():
      return Tracked(v, full + ".")
    note_field(full, v)
    return v

  def _read_all(self) -> None:
    for k in self._node.keys():
      v = self._read(k)
      if isinstance(v, Tracked):
        v._read_all()

  def __getattr__(self, key: str):
    if key.startswith("__"):
      raise AttributeError(key)
    try:
      return self._read(key)
    except KeyError:
      raise AttributeError(f"config has no field {self._prefix + key!r}") from None

  def __getitem__(self, key: str):
    return self._read(key)

  def get(self, key: str, default=None):
    if key in self._node:
      return self._read(key)
    note_field(self._prefix + key, ABSENT)
    return default

  def __contains__(self, key: str) -> bool:
    if key in self._node:
      self._read(key)
      return True
    note_field(self._prefix + key, ABSENT)
    return False

  def keys(self):
    self._read_all()
    return self._node.keys()

  def __iter__(self):
    return iter(self.keys())

  def items(self):
    return [(k, self._read(k)) for k in self._node.keys()]

  def values(self):
    return [v for _, v in self.items()]

  def to_dict(self):
    self._read_all()
    return self._node.to_dict()

  def copy_and_resolve_references(self):
    self._read_all()
    return self._node.copy_and_resolve_references()

  def derive(self, **overrides) -> Tracked:
    """This section with ``overrides`` in place of (or beside) its fields, e.g. a training
    config made from another stage's: an overridden field is not read from the config
    (not noted); the others are noted when, and only when, they are read."""
    return _Derived(self._node, self._prefix, overrides)

  def __setattr__(self, key, value):
    raise TypeError(
        f"the config is read-only while a stage runs (setting " f"{self._prefix + key!r})"
    )

  __setitem__ = __setattr__

  def __reduce__(self):
    self._read_all()
    return (_untracked, (self._node.to_dict(),))

  def __repr__(self) -> str:
    return f"Tracked({self._prefix or 'config'})"


class _Derived(Tracked):
  """:meth:`Tracked.derive`'s view."""

  __slots__ = ("_over",)

  def __init__(self, node, prefix: str, over: dict):
    super().__init__(node, prefix)
    object.__setattr__(self, "_over", dict(over))

  def _read(self, key: str):
    return self._over[key] if key in self._over else super()._read(key)

  def get(self, key: str, default=None):
    return self._over[key] if key in self._over else super().get(key, default)

  def __contains__(self, key: str) -> bool:
    return key in self._over or super().__contains__(key)

  def keys(self):
    self._read_all()
    return list(self._node.keys()) + [k for k in self._over if k not in self._node]

  def items(self):
    return [(k, self._read(k)) for k in self.keys()]

  def to_dict(self):
    return self.copy_and_resolve_references().to_dict()

  def copy_and_resolve_references(self):
    out = super().copy_and_resolve_references()
    out.update(self._over)
    return out

  def derive(self, **overrides) -> Tracked:
    return _Derived(self._node, self._prefix, {**self._over, **overrides})

  def __reduce__(self):
    return (_untracked, (self.to_dict(),))


def _untracked(d):
  return ml_collections.ConfigDict(d)


def derive(section, **overrides):
  """:meth:`Tracked.derive` for a view; for a plain ConfigDict, a copy with ``overrides``."""
  if isinstance(section, Tracked):
    return section.derive(**overrides)
  out = section.copy_and_resolve_references()
  out.update(overrides)
  return out


def raw(cfg):
  """The ConfigDict behind a view, all of it noted as read; a ConfigDict as it is."""
  if isinstance(cfg, Tracked):
    cfg._read_all()
    return cfg._node
  return cfg


def current_value(cfg, name: str):
  """Field ``name``'s JSON value in ``cfg`` (a ConfigDict), or :data:`ABSENT`."""
  node = raw(cfg)
  for part in name.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return ABSENT
    node = node[part]
  return plain(node)


# --------------------------------------------------------------------------- inputs


# The tag of a set of files identified by (relative path, label, content); bumped when the
# rule changes, so identities recorded under an older rule never equal a new one (v3: by
# content, relative paths; before: absolute paths, size and mtime).
SET_IDENTITY = "set-v3"


def file_identity(path: str) -> str:
  """One file by content (``md5:<hex>``, :func:`bssl.fileid.content_id`: hashed once per
  file version, then cached): tags, vocabularies, CSVs, idx files; ``missing`` when there
  is no file."""
  return fileid.content_id(str(path))


def common_folder(files) -> str:
  """The deepest folder holding every path of ``files`` (``""`` when they share none)."""
  files = [str(f) for f in files]
  if not files:
    return ""
  prefix = os.path.commonprefix(files)
  return prefix[: prefix.rfind("/") + 1]


def relative_names(files, root: str | None = None) -> list[str]:
  """``files`` relative to ``root`` (a folder given by the user), or when ``root`` is None
  to their :func:`common_folder`: the names a set of files is identified by, the same
  whether the set was given as a folder, a list of its files, a symlink to it, a moved
  copy or a ``gs://`` copy. A file outside ``root`` keeps its whole path."""
  files = [str(f) for f in files]
  base = common_folder(files) if root is None else str(root).rstrip("/") + "/"
  n = len(base)
  return [f[n:] if base and f.startswith(base) else f for f in files]


def files_identity(files, root: str | None = None, labels=None, progress=None) -> str:
  """A set of files (in its order) by (path relative to ``root`` or, when None, to the
  files' common folder, label when ``labels`` are given, content id): image and video
  folders and lists, TFDS builds, checkpoints. Content ids come from
  :func:`bssl.fileid.content_ids` (hashed once per file version); the result is kept
  under the files' versions (:func:`bssl.fileid.stamps_digest`), so a rerun that changed
  nothing costs one ``stat`` per file and one lookup."""
  files = [str(f) for f in files]
  names = relative_names(files, root)
  if labels is not None:
    names = [f"{rel}\0{int(lab)}" for rel, lab in zip(names, labels)]
  # the names (and labels) in id order: what the ids mean; then the content of each
  h = hashlib.blake2b("\n".join(names).encode("utf-8", "surrogateescape"), digest_size=16)
  key = fileid.stamps_digest(files, salt=f"{SET_IDENTITY}\0{h.hexdigest()}:{len(files)}")
  hit = fileid.recall(key)
  if hit is not None:
    return hit
  h.update(("\0" + "\n".join(fileid.content_ids(files, progress=progress))).encode())
  out = f"{SET_IDENTITY}:{h.hexdigest()}:n={len(files)}"
  fileid.remember(key, out)
  return out


def tree_identity(path: str) -> str:
  """A folder by (path relative to it, content) of every file in it (a TFDS build, a
  folder of variables); ``missing`` when there is no such folder."""
  p = storage.path(path)
  if not p.is_dir():
    return "missing"
  root = str(p)
  return files_identity([root.rstrip("/") + "/" + r for r in storage.find(root)], root=root)


def checkpoint_identity(path: str) -> str:
  """A folder of variables (a converted checkpoint, another run's ``final/``) by
  :func:`tree_identity`; a single file by its content."""
  p = storage.path(path)
  if not p.exists():
    return "missing"
  return tree_identity(path) if p.is_dir() else file_identity(path)


# How a recorded input of each kind is identified again by a rerun: files and folders here;
# the data layer adds the kinds of the data formats it reads (:func:`register_identity`),
# so the record itself knows no data format. (``tree_content``: the same as ``tree`` now
# that every folder is identified by content; kept for records that name it.)
IDENTITY: dict[str, Callable[[str], str]] = {
    "file": file_identity,
    "tree": tree_identity,
    "checkpoint": checkpoint_identity,
    "tree_content": tree_identity,
}


# Methods whose answers a stage keeps (the copy matcher: which images of U are copies):
# {name: version}, the version changed whenever the answers do; see note_method.
METHODS: dict[str, str] = {}


def register_method(name: str, version: str) -> None:
  """Declares method ``name`` (a module whose answers a stage keeps) at ``version``: a stage
  that noted another version (:func:`note_method`) no longer holds, whatever its fields."""
  METHODS[name] = str(version)


def note_method(name: str) -> str:
  """Notes that the running stage's output is made by method ``name`` as registered now
  (:func:`register_method`): a rerun after the method changed finds the stage stale and says
  so, instead of keeping answers the method would no longer give or mixing the two in a
  resumed stage's parts."""
  return note_input(f"method.{name}", "method", name, ident=METHODS[name])


def _unnoted_methods(record: dict, names) -> list[str]:
  """Lines naming each method of ``names`` that ``record`` (of a stage that uses them with
  the config now) did not note: the stage was made by a bssl that did not record them, so
  by which version is unknown."""
  files = (record or {}).get("files") or {}
  return [
      f"method.{m}: this bssl's method is {METHODS[m]}; the stage's output was made by a "
      f"bssl that did not record its method (before 2026-12-08)"
      for m in names
      if f"method.{m}" not in files
  ]


def _method_identity(name: str) -> str:
  return METHODS.get(name, "(not loaded)")


IDENTITY["method"] = _method_identity


def register_identity(kind: str, fn: Callable[[str], str]) -> None:
  """Teaches the record to identify inputs of ``kind`` (a data format: ``shards``,
  ``filelist``) again from their path: ``fn(path)`` is what the source at ``path`` says it
  is, the value :func:`note_input` was given when the stage read it."""
  IDENTITY[kind] = fn


_cache: dict[tuple, str] = {}


def identity(kind: str, path: str) -> str:
  """The identity of ``path`` as ``kind`` now (computed once per process and kind)."""
  key = (kind, str(path))
  with _lock:
    if key in _cache:
      return _cache[key]
  fn = IDENTITY.get(kind)
  if fn is None:
    raise KeyError(
        f"no identity for inputs of kind {kind!r} (kinds: {sorted(IDENTITY)}); the data "
        f"modules register theirs when imported"
    )
  try:
    v = fn(str(path))
  except FileNotFoundError:
    v = "missing"
  with _lock:
    _cache[key] = v
  return v


def forget_identities() -> None:
  """Drops the identities computed so far (a long-lived process between runs: tests)."""
  with _lock:
    _cache.clear()


def note_input(key: str, kind: str, path: str, ident: str | None = None) -> str:
  """Notes input ``key`` (e.g. ``weak.tags_file``) at ``path`` with its identity: ``ident``
  when the caller has it (a data source's own ``identity()``), else computed with
  :data:`IDENTITY` ``[kind]``. A rerun checks a ``kind='data'`` input against the data it
  opens again (:func:`current_files`), any other kind by :data:`IDENTITY` ``[kind]``."""
  v = ident if ident is not None else identity(kind, path)
  entry = {"kind": kind, "path": str(path), "id": v}
  _notify(lambda r: r._file(key, entry))
  return v


class Memo:
  """A value computed once, with the record of what computing it read; every :meth:`get`
  replays that record into the active recorders."""

  def __init__(self, value, rec: Recorder):
    self.value, self.rec = value, rec

  @classmethod
  def compute(cls, fn: Callable[[], Any], *replayed: Memo) -> Memo:
    rec = Recorder()
    for m in replayed:
      rec.merge(m.rec)
    with recording(rec):
      value = fn()
    return cls(value, rec)

  def get(self):
    replay(self.rec)
    return self.value


# --------------------------------------------------------------------------- checks


def _fmt(v) -> str:
  return "(absent)" if v == ABSENT else repr(v)


# A path-valued field (``Field.path``: data.train_dir, unlabelled.path, teacher.init_from,
# ...) is compared by what it names, not by its string: a new value is no change when every
# input the stage read through the field is in the record (entries keyed by the field's
# name or ``<field>:...``) and can be found again under the new value; those entries are
# then compared by identity (what the data opens now, or the recorded file looked up under
# the new value: :func:`entry_path_now`). A path field with no such entry is compared as a
# string (a change, the safe default).


def _is_path_field(name: str) -> bool:
  f = _schema().get(name)
  return bool(f is not None and getattr(f, "path", False))


def _field_of(key: str) -> str:
  return key.split(":", 1)[0]


def _rebase(path: str, old: str, new: str) -> str | None:
  """``path`` (under ``old``) under ``new``; None when it is not under ``old``."""
  o, n = (old.rstrip("/") or old), (new.rstrip("/") or new)
  if path in (old, o):
    return n
  if path.startswith(o + "/"):
    return n + path[len(o) :]
  return None


def _both_paths(old, new) -> bool:
  return (
      isinstance(old, str)
      and isinstance(new, str)
      and bool(old)
      and bool(new)
      and old not in ALL_STAGES
      and new not in ALL_STAGES
  )


def path_moved(record: dict, name: str, old, new) -> bool:
  """Whether path field ``name``'s change from ``old`` to ``new`` is left to the identity
  of what it names (see above): True when every input of ``record`` read through the field
  is compared by identity under the new value."""
  if not (_is_path_field(name) and _both_paths(old, new)):
    return False
  entries = [e for k, e in (record.get("files") or {}).items() if k == name or _field_of(k) == name]
  return bool(entries) and all(
      e["kind"] == "data" or _rebase(str(e["path"]), old, new) is not None for e in entries
  )


def entry_path_now(record: dict, cfg, key: str, entry: dict) -> str:
  """Where the input of ``entry`` (recorded under ``key``) is now: its recorded path, or,
  when the path field it was read through names another place now (:func:`path_moved`),
  the same path under the field's new value."""
  name = _field_of(key)
  old = (record.get("fields") or {}).get(name, ABSENT)
  new = current_value(cfg, name)
  if old != new and path_moved(record, name, old, new):
    return _rebase(str(entry["path"]), old, new) or str(entry["path"])
  return str(entry["path"])


def field_changes(record: dict, cfg) -> list[str]:
  """The recorded fields whose value differs now (``name: old -> new``), path fields whose
  new value names the same inputs left out (:func:`path_moved`)."""
  out = []
  for name, old in sorted((record.get("fields") or {}).items()):
    new = current_value(cfg, name)
    if new != old and not path_moved(record, name, old, new):
      out.append(f"{name}: {_fmt(old)} -> {_fmt(new)}")
  return out


def current_entries(data) -> dict[str, dict]:
  """{key: {"kind", "path", "id"}} of the inputs noted while the data was opened in this
  run: what the run opens now and where it found it (a folder's listing, the candidate
  chosen among ``x.gz`` and ``x``, the TFDS build a name resolves to)."""
  out = {}
  for rec in (data.records() if data is not None and hasattr(data, "records") else ()):
    for k, e in rec.files.items():
      out[k] = e
  return out


def current_files(data) -> dict[str, str]:
  """{key: identity} of the inputs noted while the data was opened in this run."""
  return {k: e["id"] for k, e in current_entries(data).items()}


def check_record(
    record: dict,
    cfg,
    data=None,
    input_ids: dict | None = None,
    backend: str | None = None,
    methods=(),
) -> list[str]:
  """What differs between ``record`` (of a finished or started stage) and now, as lines
  naming each field, input file or input stage: empty when the record still holds.
  ``input_ids``: {stage: artifact id now} (None for a stage being recomputed); ``methods``:
  those the stage uses with ``cfg`` (``Stage.methods``), each of which the record must have
  noted (:func:`note_method`; a changed version is a changed input like any other)."""
  if not record or record.get("version") != RECORD_VERSION:
    return [
        "made by an older bssl, which recorded its dependencies differently (record "
        f"version {(record or {}).get('version', 1)}, this bssl writes "
        f"{RECORD_VERSION})"
    ]
  out = field_changes(record, cfg)  # (path fields by what they name)
  # An input the data noted again now (every run opens the data afresh) is compared with
  # what the run opens now, wherever it finds it: not re-identified at the recorded path,
  # which a new candidate (x.gz beside x), a new file in a listed folder or a new TFDS
  # build could shadow. Other inputs are identified again where they are now.
  now_data = current_entries(data)
  for key, e in sorted((record.get("files") or {}).items()):
    now = now_data.get(key)
    if now is not None:
      new = now["id"]
    elif e["kind"] == "data":
      new = "(not read now)"
    else:
      new = identity(e["kind"], entry_path_now(record, cfg, key, e))
    if new == e["id"]:
      continue
    if e["kind"] == "method":
      out.append(f"{key}: this bssl's method is {new}, the stage's output was made by {e['id']}")
    elif now is not None and str(now["path"]) != str(e["path"]):
      out.append(
          f"{key}: the run opens {now['path']} now, {e['path']} when recorded "
          f"(identity {e['id']} -> {new})"
      )
    else:
      out.append(
          f"{e['path']} ({key}): its contents changed since (identity {e['id']} -> " f"{new})"
      )
  for up, old in sorted((record.get("inputs") or {}).items()):
    if up not in (input_ids or {}):
      out.append(f"input {up!r} is not read with this config")
      continue
    new = input_ids[up]
    if new != old:
      out.append(
          f"input {up!r} was recomputed since (artifact {old} -> "
          f"{new if new is not None else '(recomputed in this run)'})"
      )
  if backend is not None and record.get("backend") != backend:
    out.append(f"backend: {record.get('backend')!r} -> {backend!r}")
  return out + _unnoted_methods(record, methods)
