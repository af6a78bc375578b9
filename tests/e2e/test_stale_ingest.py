"""An ingest is what it was made from (issue 29, items 2 and 3), checked as a user meets it:

- the ingest's own rerun (``python -m bssl.ingest``) compares every finished shard's input
  files by content (MD5, cached by inode, size, mtime and ctime): images rewritten with
  other pixels (same size, mtime put back) into a complete ``--out``, or changed between a
  ``kill -9`` and the resume, are refused (exit 2, a changed file named) instead of
  "already complete" or a mix of old and new shards; the unchanged input (the same folder,
  moved, or a file list of it) is "already complete" without reading the images again;
- a stage's record holds an ingest's metadata apart from its pixels, noted by the stage
  that reads it: an ingest re-made with other captions makes ``weak_pretrain`` on
  captions stale and nothing else; one re-made with other keys and urls makes ``select``
  (D-hat's table) stale and nothing else.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import wds_fixture
from PIL import Image

from bssl import deps, engine, fileid
from bssl.data import ingest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FMNIST = os.path.exists("/usr/share/datasets/fashion-mnist")


def _bmp(path, seed, size=(12, 10)):
  """A BMP of ``size`` (a BMP's byte size depends on its size only)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  px = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(px).save(path, "BMP")


def _folder(root, n, seed=0):
  """``n`` BMPs under ``root`` (some in a subfolder); their relative names, sorted."""
  names = [f"{'sub/' if i % 3 == 0 else ''}{i:04d}.bmp" for i in range(n)]
  for i, name in enumerate(names):
    _bmp(os.path.join(root, name), seed * 100_000 + i)
  return sorted(names)


def _rewrite_keeping_stat(path, seed):
  """Other pixels, the same size in bytes, the old mtime put back (as a copy tool or an
  archive extraction leaves it)."""
  st = os.stat(path)
  _bmp(path, seed)
  assert os.path.getsize(path) == st.st_size
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _cli(*args, **kw):
  return subprocess.run(
      [sys.executable, "-m", "bssl.ingest", *args],
      capture_output=True,
      text=True,
      timeout=300,
      cwd=ROOT,
      **kw,
  )


def _manifest(out):
  return json.load(open(os.path.join(out, "manifest.json")))


def _refused(r, changed_file: str, count: str):
  """Exit 2, one line naming a changed file and how many, and what to do."""
  assert r.returncode == 2, r.stdout + r.stderr
  err = r.stderr.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert changed_file in err and count in err, err
  assert "use another --out, or delete" in err, err


# ------------------------------------------------------------------ the ingest's own rerun


def test_rewritten_images_into_a_complete_out_are_refused_not_already_complete(tmp_path):
  """(a) Every image rewritten with other pixels (same byte size, mtime put back), then the
  same command: exit 2 naming a changed file (it said "already complete" and kept the old
  images); the shards are untouched."""
  u, out = str(tmp_path / "u"), str(tmp_path / "out")
  names = _folder(u, 8)
  ingest.run_ingest(u, out, ingest.Params(shard_size=3), log=lambda m: None)
  before = _manifest(out)
  for i, name in enumerate(names):
    _rewrite_keeping_stat(os.path.join(u, name), 1000 + i)
  r = _cli(f"--input={u}", f"--out={out}", "--shard_size=3")
  _refused(r, os.path.join(u, names[0]), "8 of the 8 input files")
  assert _manifest(out) == before


def test_unchanged_input_is_already_complete_moved_or_listed_and_not_read_again(
    tmp_path, monkeypatch
):
  """(c) The same command again, the folder moved (``mv``) or given as a file list of it:
  exit 0, "already complete", the shards untouched; the check stats the files and reads
  none (their MD5s are cached under inode, size, mtime and ctime)."""
  u, out = str(tmp_path / "u"), str(tmp_path / "out")
  names = _folder(u, 7)
  time.sleep(fileid.RACY_SECONDS + 0.1)  # (files hashed within 2 s of a write are not cached)
  params = ingest.Params(shard_size=3)
  ingest.run_ingest(u, out, params, log=lambda m: None)
  before = _manifest(out)
  stamp = os.stat(os.path.join(out, "manifest.json")).st_mtime_ns
  r = _cli(f"--input={u}", f"--out={out}", "--shard_size=3")
  assert r.returncode == 0 and "already complete" in r.stdout, r.stdout + r.stderr
  moved = str(tmp_path / "elsewhere" / "u2")
  os.makedirs(os.path.dirname(moved))
  subprocess.run(["mv", u, moved], check=True)
  lst = tmp_path / "list.txt"
  lst.write_text("".join(f"elsewhere/u2/{n}\n" for n in reversed(names)))
  # (in this process, from now on with a fresh copy of the file-identity cache): the images
  # are checked without reading any of them
  fileid.forget()
  read = []
  real = fileid._md5_file
  monkeypatch.setattr(fileid, "_md5_file", lambda p: read.append(p) or real(p))
  for src in (moved, str(lst)):
    said = []
    m = ingest.run_ingest(src, out, params, log=said.append)
    assert m == before and "already complete" in said[-1], (src, said)
  assert read == []
  assert _manifest(out) == before
  assert os.stat(os.path.join(out, "manifest.json")).st_mtime_ns == stamp
  # one image rewritten (same size, same mtime): found, and only it is read
  _rewrite_keeping_stat(os.path.join(moved, names[4]), 77)
  with pytest.raises(ingest.IngestError, match=r"1 of the 7 input files.*" + names[4]):
    ingest.run_ingest(moved, out, ingest.Params(shard_size=3), log=lambda m: None)
  assert read == [os.path.join(moved, names[4])]


def test_kill_9_then_changed_files_then_resume_is_refused_never_mixed(tmp_path):
  """(b) ``kill -9`` of an ingest after some shards, then files changed, then the same
  command: a changed file of a finished shard is refused (exit 2, named), never a complete
  ingest mixing old and new shards; a change in a shard not yet written is simply
  ingested; the file put back (same bytes, new inode and times) resumes, to exactly the
  ingest of the files as they are."""
  u, out = str(tmp_path / "u"), str(tmp_path / "out")
  names = _folder(u, 240)
  cmd = [sys.executable, "-m", "bssl.ingest", f"--input={u}", f"--out={out}", "--shard_size=1"]
  p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  third = os.path.join(out, "shards", "u-00002.npz")
  deadline = time.time() + 120
  while time.time() < deadline and not os.path.exists(third):
    time.sleep(0.005)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  done = sorted(f for f in os.listdir(os.path.join(out, "shards")) if f.endswith(".npz"))
  assert 3 <= len(done) < len(names)
  first, last = os.path.join(u, names[0]), os.path.join(u, names[-1])
  kept = open(first, "rb").read()
  _rewrite_keeping_stat(first, 5000)  # in finished shard 0
  _rewrite_keeping_stat(last, 5001)  # in a shard not written yet
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  _refused(r, first, f"1 of the {len(done)} input files of its {len(done)} finished shard(s)")
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  os.remove(first)
  open(first, "wb").write(kept)  # the same bytes again: the same input
  said = []
  ingest.run_ingest(u, out, ingest.Params(shard_size=1), log=said.append)
  assert said[-1].startswith("ingest: complete: 240 images"), said
  fresh = str(tmp_path / "fresh")
  ingest.run_ingest(u, fresh, ingest.Params(shard_size=1), log=lambda m: None)
  for key in ("content_digest", "input_content", "metadata_digests"):
    assert _manifest(out)[key] == _manifest(fresh)[key], key


# ------------------------------------------------ an ingest's metadata in a stage's record

WORDS_B = ("lake", "moon", "snow", "road", "bird", "fish", "door", "rock", "lamp", "leaf")


def _make_tars(root, captions=wds_fixture.WORDS, url_host="example.com", key_prefix=""):
  """Two img2dataset-style shards of 10 samples: the same images whatever the captions'
  words, the urls' host or the keys' prefix."""
  os.makedirs(root, exist_ok=True)
  g = 0
  for s in range(2):
    with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tf:
      for j in range(10):
        key = f"{key_prefix}{s:05d}{j:04d}"
        rng = np.random.default_rng(g)
        caption = " ".join(rng.choice(captions, 3)) + f" #{captions[g % len(captions)]}"
        img = wds_fixture.encode(wds_fixture.photo(40, 40, g), quality=90)
        meta = {"url": f"https://{url_host}/{g}.jpg", "caption": caption, "key": key}
        meta["status"] = "success"
        wds_fixture._add(tf, f"{key}.jpg", img)
        wds_fixture._add(tf, f"{key}.json", json.dumps(meta).encode())
        wds_fixture._add(tf, f"{key}.txt", caption.encode())
        g += 1


def _ingest_tars(tars, out):
  return ingest.run_ingest(tars, out, log=lambda m: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The tar ingest at one path, read by one finished run (semiweak:tiny): weak_pretrain on
  its captions, and baseline, teacher (from scratch), score and select with it as U."""
  from bssl.configs import semiweak

  base = tmp_path_factory.mktemp("meta")
  tars, out = str(base / "tars"), str(base / "ingest")
  _make_tars(tars)
  first = _ingest_tars(tars, out)
  cfg = semiweak.get_config("tiny")
  cfg.stages = "weak_pretrain,baseline,teacher,score,select"
  cfg.weak.kind, cfg.weak.path, cfg.weak.vocab_size = "captions", out, 6
  cfg.weak.min_tag_images = 1
  cfg.teacher.init_from = None  # (so that score and select do not read weak_pretrain)
  cfg.unlabelled.kind, cfg.unlabelled.path = "shards", out
  wd = str(base / "w")
  engine.run_recipe(cfg, wd)
  return {"tars": tars, "out": out, "cfg": cfg, "wd": wd, "first": first}


def _remake(runs, **variant):
  """The ingest at the same path made again from tars with other metadata (the images the
  same): the old tars into the complete --out are refused first (item 2 for tars).
  Returns the manifests (of the ingest the runs read, of the new one)."""
  tars, out = runs["tars"], runs["out"]
  old = runs["first"]
  shutil.rmtree(tars)
  _make_tars(tars, **variant)
  with pytest.raises(ingest.IngestError, match=r"2 of the 2 input files.*/00000\.tar"):
    ingest.run_ingest(tars, out, log=lambda m: None)
  shutil.rmtree(out)
  new = _ingest_tars(tars, out)
  assert new["content_digest"] == old["content_digest"]  # the same pixels
  deps.forget_identities()
  return old, new


def _rerun(runs):
  """The run again: {stage: info} of the stages it ran, or the stale stages' part of the
  refusal's message."""
  try:
    return engine.run_recipe(runs["cfg"], runs["wd"])
  except engine.RefusedError as e:
    return str(e).split(" holds results made with a different config or inputs (", 1)[1]


@pytest.mark.skipif(not FMNIST, reason="needs Debian's dataset-fashion-mnist")
def test_other_captions_make_weak_pretrain_on_captions_stale_and_nothing_else(runs):
  """(d) The ingest re-made with other captions: the weak model trained on the old
  vocabulary is stale (refused, naming weak.path:captions); the stages that read U's
  pixels (score) and keys (select) are not. (Nothing is recomputed: each test compares
  with the run's ingest.)"""
  old, new = _remake(runs, captions=WORDS_B)
  assert new["metadata_digests"]["captions"] != old["metadata_digests"]["captions"]
  assert new["metadata_digests"]["keys"] == old["metadata_digests"]["keys"]
  rec = json.load(open(os.path.join(runs["wd"], "weak_pretrain", "done.json")))["record"]
  assert rec["files"]["weak.path:captions"]["kind"] == "shards_captions"
  why = _rerun(runs)
  assert isinstance(why, str) and why.startswith("weak_pretrain: "), why
  assert "(weak.path:captions): its contents changed" in why, why
  assert "score: " not in why and "select: " not in why, why
  rec = json.load(open(os.path.join(runs["wd"], "score", "done.json")))["record"]
  assert "unlabelled.path" in rec["files"]
  assert not [k for k in rec["files"] if k.startswith("unlabelled.path:")]


@pytest.mark.skipif(not FMNIST, reason="needs Debian's dataset-fashion-mnist")
def test_other_keys_and_urls_make_select_stale_and_nothing_else(runs):
  """(e) The ingest re-made with other keys and urls (the images and captions the same):
  select, whose dhat.parquet and bad-image list name them, is stale (refused, naming
  unlabelled.path:keys); score (pixels) and weak_pretrain (captions) are not; the
  ingest as the run read it is reused whole."""
  old, new = _remake(runs, url_host="cdn.example.org", key_prefix="k")
  assert new["metadata_digests"]["keys"] != old["metadata_digests"]["keys"]
  assert new["metadata_digests"]["captions"] == old["metadata_digests"]["captions"]
  rec = json.load(open(os.path.join(runs["wd"], "select", "done.json")))["record"]
  assert rec["files"]["unlabelled.path:keys"]["kind"] == "shards_keys"
  why = _rerun(runs)
  assert isinstance(why, str) and why.startswith("select: "), why
  assert "(unlabelled.path:keys): its contents changed" in why, why
  assert "score: " not in why and "weak_pretrain: " not in why, why
  _remake(runs)  # the run's own ingest again: nothing stale, nothing run
  assert _rerun(runs) == {}


def test_ingest_metadata_digests_cover_each_column_group(tmp_path):
  """manifest.json's metadata digests equal what the shards' columns give (recomputed for
  an ingest made before they were written); the reader notes each group only when it is
  read; a moved ingest has the same three identities."""
  from bssl.data import images, shards

  tars, out = str(tmp_path / "t"), str(tmp_path / "o")
  _make_tars(tars)
  m = _ingest_tars(tars, out)
  assert shards.metadata_digests(out, m["num_shards"]) == m["metadata_digests"]
  src = images.open_images(out, kind="shards")
  rec = deps.Recorder()
  with deps.recording(rec):
    images.note_images("unlabelled.path", out, src)
    src[0]  # pixels
    assert set(rec.files) == {"unlabelled.path"}
    src.fields([0, 1], "caption")
    assert set(rec.files) == {"unlabelled.path", "unlabelled.path:captions"}
    src.name_of(3)
  assert rec.files["unlabelled.path:keys"]["id"] == deps.identity("shards_keys", out)
  assert rec.files["unlabelled.path:captions"]["id"] == deps.identity("shards_captions", out)
  del m["metadata_digests"]
  json.dump(m, open(os.path.join(out, "manifest.json"), "w"))
  assert shards.metadata_identity_of(out, "keys") == rec.files["unlabelled.path:keys"]["id"]
  # the ingest moved: the same identities at its new path (no path is in them)
  moved = str(tmp_path / "moved")
  subprocess.run(["mv", out, moved], check=True)
  deps.forget_identities()
  for key, e in rec.files.items():
    assert deps.identity(e["kind"], moved) == e["id"], key
