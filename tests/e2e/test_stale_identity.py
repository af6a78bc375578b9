"""Identities that see swaps and survive moves (issue 29, items 5 and 6), checked as a user
would meet them: ``python -m bssl.main`` on a small class-per-subfolder folder, changed
or moved with real ``tar``, ``mv``, ``cp -a`` and ``ln -s``.

* Class folders swapped when their files share sizes and mtimes (an archive's extraction
  gives every file one mtime; ``mv`` keeps it) and a file rewritten with its size and
  mtime restored are refused (exit 2, the changed input named): files are identified by
  content, not by (size, mtime).
* The same data moved, reached through a symlink, copied with ``cp -a`` or given as a
  file list is reused (exit 0, every stage "skipping"): path fields are compared by what
  they name, and a set of files by paths relative to its folder.
* A ``gs://`` copy of a folder has the local folder's identity.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = "baseline,teacher,score"  # the teacher is the baseline (demo): score reads U


def _make_source(src):
  """``src/shapes/{train,test}/{cat,dog}`` and ``src/shapes/u``: 8x8 BMP images (every
  file 246 bytes, so a swap keeps every size), each with other pixels."""
  from PIL import Image

  rng = np.random.default_rng(0)
  base = {"cat": (200, 60, 60), "dog": (60, 60, 200)}
  for split, n in (("train", 6), ("test", 2)):
    for name, rgb in base.items():
      os.makedirs(os.path.join(src, "shapes", split, name))
      for i in range(n):
        img = rng.normal(rgb, 30, (8, 8, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(src, "shapes", split, name, f"{i}.bmp"))
  os.makedirs(os.path.join(src, "shapes", "u", "more"))
  for i in range(6):
    img = rng.normal(base["cat" if i % 2 else "dog"], 30, (8, 8, 3)).clip(0, 255)
    sub = "more/" if i >= 4 else ""
    Image.fromarray(img.astype(np.uint8)).save(os.path.join(src, "shapes", "u", f"{sub}{i}.bmp"))


def _sh(cmd, cwd):
  subprocess.run(cmd, shell=True, cwd=cwd, check=True)


def flags(data, u=None):
  f = dict(
      kind="image_folder",
      train_dir=f"{data}/train",
      test_dir=f"{data}/test",
      num_classes=2,
      channels=3,
      image_size=8,
      mean="128,128,128",
      std="64,64,64",
      augment="none",
      eval_transform="none",
      labelled_per_class=2,
      val_per_class=1,
  )
  return [f"--config.data.{k}={v}" for k, v in f.items()] + [
      "--config.unlabelled.kind=image_folder",
      f"--config.unlabelled.path={u or f'{data}/u'}",
      "--config.select.k=2",
      "--config.baseline.steps=2",
      "--config.baseline.batch_size=8",
      f"--config.stages={STAGES}",
  ]


def bssl_main(wd, data, u=None, timeout=300, extra=()):
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "bssl.main",
          "--config=configs/demo.py:tiny",
          f"--workdir={wd}",
          *flags(data, u),
          *extra,
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def reused(r) -> bool:
  return r.returncode == 0 and r.stdout.count("skipping") == len(STAGES.split(","))


def refused(r, what: str) -> bool:
  err = r.stderr.strip()
  return r.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and what in err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The data as an archive leaves it (``tar`` with one mtime for every file, extracted),
  and one run of baseline, teacher and score on it: (data folder, work directory)."""
  tmp = tmp_path_factory.mktemp("stale_identity")
  _make_source(str(tmp / "src"))
  _sh("tar --mtime='2026-01-01 00:00:00' -cf shapes.tar -C src shapes", tmp)
  os.makedirs(tmp / "x")
  _sh("tar -xf ../shapes.tar", tmp / "x")
  data, wd = tmp / "x" / "shapes", tmp / "run"
  r = bssl_main(wd, data)
  assert r.returncode == 0, r.stderr[-3000:]
  assert reused(bssl_main(wd, data))
  return data, wd


def _stamps(folder):
  out = {}
  for d, _, files in os.walk(folder):
    for f in files:
      st = os.stat(os.path.join(d, f))
      out[os.path.relpath(os.path.join(d, f), folder)] = (st.st_size, st.st_mtime_ns)
  return out


def test_class_folders_swapped_with_equal_sizes_and_mtimes_are_refused(run):
  data, wd = run
  before = _stamps(data / "train")
  _sh("mv cat tmp && mv dog cat && mv tmp dog", data / "train")
  try:
    assert _stamps(data / "train") == before  # every path, size and mtime as it was
    r = bssl_main(wd, data)
    assert refused(r, "(data.train_dir): its contents changed"), r.stderr[-2000:]
    assert "baseline:" in r.stderr and "score:" in r.stderr
  finally:
    _sh("mv cat tmp && mv dog cat && mv tmp dog", data / "train")
  assert reused(bssl_main(wd, data))  # swapped back: the same data again


def test_a_file_rewritten_with_its_size_and_mtime_restored_is_refused(run):
  data, wd = run
  f = data / "u" / "3.bmp"
  old, st = f.read_bytes(), os.stat(f)
  new = old[:-3] + bytes(255 - b for b in old[-3:])  # one pixel other, same size
  try:
    f.write_bytes(new)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(f).st_size, os.stat(f).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    r = bssl_main(wd, data)
    assert refused(r, "(unlabelled.path): its contents changed"), r.stderr[-2000:]
    assert "score:" in r.stderr and "baseline:" not in r.stderr  # the baseline never read U
  finally:
    f.write_bytes(old)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert reused(bssl_main(wd, data))


@pytest.mark.parametrize("how", ["mv", "ln -s", "cp -a", "file list"])
def test_the_same_data_moved_linked_copied_or_listed_is_reused(run, tmp_path, how):
  data, wd = run
  where, u = tmp_path / "elsewhere", None
  if how == "mv":
    _sh(f"mv {data} {where}", tmp_path)
  elif how == "ln -s":
    _sh(f"ln -s {data} {where}", tmp_path)
  elif how == "cp -a":
    _sh(f"cp -a {data} {where}", tmp_path)
  else:  # U as a list of its files, written elsewhere (absolute paths, any order)
    where = data
    u = tmp_path / "lists" / "u.txt"
    u.parent.mkdir()
    _sh(f"find {data}/u -name '*.bmp' | sort -r > {u}", tmp_path)
  try:
    r = bssl_main(wd, where, u)
    assert reused(r), r.stdout[-2000:] + r.stderr[-2000:]
  finally:
    if how == "mv":
      _sh(f"mv {where} {data}", tmp_path)


def test_a_gs_copy_has_the_identity_of_the_local_folder(run, gcs):
  data, _ = run
  code = f"""
      import os
      from etils import epath
      from bssl.data import sources
      local, remote = {str(data)!r}, {gcs.url("stale_identity/shapes")!r}
      for d, _, files in os.walk(local):
        for f in files:
          p = os.path.join(d, f)
          (epath.Path(remote) / os.path.relpath(p, local)).write_bytes(open(p, "rb").read())
      from bssl import fileid
      for list_from in (10**9, 1):  # MD5s asked object by object; read from the listing
        fileid._LIST_FROM = list_from
        for sub in ("u", "train"):
          a = sources.ImageFileSource(local + "/" + sub).identity()
          b = sources.ImageFileSource(remote + "/" + sub).identity()
          assert a == b, (sub, a, b)
        a = sources.LabelledFolderSource(local + "/train").identity()
        b = sources.LabelledFolderSource(remote + "/train").identity()
        assert a == b, (a, b)
      files = sources.ImageFileSource(remote + "/u").files
      listed = fileid._listed_md5s(files)
      here = fileid.content_ids(sources.ImageFileSource(local + "/u").files)
      assert [listed.get(f) for f in files] == here, (listed, here)
      print("same", a)
  """
  r = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      env={**os.environ, **gcs.env},
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert r.returncode == 0 and "same files-v3:" in r.stdout, r.stdout + r.stderr[-3000:]


def test_a_path_field_is_compared_by_what_it_names(tmp_path):
  """The record's side of it, for inputs a stage notes itself (a checkpoint, a tags file):
  a path field's new value is no change when the inputs noted through it are the same
  under the new value, and is one when they differ there or when none was noted."""
  from bssl import deps
  from bssl.configs import demo

  a, b = tmp_path / "a", tmp_path / "b"
  (a / "sub").mkdir(parents=True)
  (a / "sub" / "w.bin").write_bytes(b"weights")
  (a / "tags.txt").write_text("x y\n")
  cfg = demo.get_config("tiny")
  cfg.teacher.init_from, cfg.weak.tags_file = str(a), str(a / "tags.txt")
  rec = deps.Recorder()
  with deps.recording(rec):
    t = deps.Tracked(cfg)
    deps.note_input("teacher.init_from", "checkpoint", t.teacher.init_from)
    deps.note_input("weak.tags_file", "file", t.weak.tags_file)
    _ = t.data.video_dir  # a path field read, with no input noted through it
  record = dict(rec.to_dict(), version=deps.RECORD_VERSION, inputs={}, backend="jax")

  def changes(**over):
    c = cfg.copy_and_resolve_references()
    for k, v in over.items():
      sec, name = k.split("__")
      c[sec][name] = v
    deps.forget_identities()
    return deps.check_record(record, c, None, {}, "jax")

  assert changes() == []
  _sh(f"cp -a {a} {b}", tmp_path)
  assert changes(teacher__init_from=str(b), weak__tags_file=str(b / "tags.txt")) == []
  assert changes(teacher__init_from=str(b) + "/") == []
  (b / "sub" / "w.bin").write_bytes(b"other!!")  # other variables under the new path
  out = changes(teacher__init_from=str(b))
  assert len(out) == 1 and "(teacher.init_from): its contents changed" in out[0]
  assert changes(teacher__init_from="baseline") == ["teacher.init_from: %r -> 'baseline'" % str(a)]
  assert changes(data__video_dir=str(b)) == [f"data.video_dir: None -> {str(b)!r}"]


def test_moved_images_make_only_what_wrote_their_names_stale(run, tmp_path):
  # select writes U's file names into dhat.parquet: the same images moved are the same
  # input for every stage but select, whose table would name files that are gone
  data, wd0 = run
  wd = tmp_path / "run"
  shutil.copytree(wd0, wd)
  args = [f"--config.stages={STAGES},select"]
  r = bssl_main(wd, data, extra=args)
  assert r.returncode == 0, r.stderr[-3000:]
  where = tmp_path / "elsewhere"
  _sh(f"cp -a {data} {where}", tmp_path)
  r = bssl_main(wd, where, extra=args)
  assert refused(r, "(unlabelled.path:keys)"), r.stderr[-2000:]
  assert "select:" in r.stderr and "score:" not in r.stderr and "baseline:" not in r.stderr
  r = bssl_main(wd, where, extra=[*args, "--recompute_stale"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("skipping") == len(STAGES.split(","))  # only select recomputed
  keys = pq.read_table(wd / "select" / "dhat.parquet").column("key").to_pylist()
  assert keys and all(k.startswith(f"{where}/u/") and os.path.exists(k) for k in keys)
