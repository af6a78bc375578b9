"""Web copies (issue 30): every family of bssl/data/webcopy.py (caption band, text,
sticker, letterbox, padding, 60% crop, stretch, rotation, perspective, JPEG 10-20, 0.3x,
strong colour, grey + mirror, blur, sharpening) and pairs of them are found by
``neardup.Index`` on tiles of real photographs, other tiles of the same photographs
(transformed) are not, and near-duplicates within one set are paired. The full measurement
is benchmarks/webcopies.py (docs/webdataset.md); this is its small, fast form."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from bssl.data import neardup, planted, webcopy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
webcopies = pytest.importorskip("webcopies")  # (scikit-image: a dev requirement)


@pytest.fixture(scope="module")
def data():
  return webcopies.make_set(24, 240, 2, 10, seed=3, per_family=1)


@pytest.fixture(scope="module")
def matched(data):
  index = neardup.Index(data["ev"])
  n = len(data["copies"])
  m = index.match(data["copies"] + data["clean"])
  found = m.copy[:n] & (m.index[:n] == data["source"])
  return found, m.copy[n:], m


def test_every_family_is_found(data, matched):
  found, _, _ = matched
  fam = data["family"]
  by = {f: found[fam == f].mean() for f in np.unique(fam)}
  assert set(by) == set(webcopy.FAMILIES) | {"combo"}
  # 24 images a family: the benchmark's figures (docs/webdataset.md) are the measurement;
  # here each family must be found mostly, and all of them together at the benchmark's level
  assert min(by.values()) >= 0.6, by
  assert found.mean() >= 0.88, by


def test_look_alikes_are_not_copies(matched):
  _, fp, _ = matched
  assert fp.mean() <= 0.01, fp.sum()


def test_what_the_old_method_missed_is_found(data, matched):
  """The overlay, band, padding, crop and geometry families the correlation method
  (ThumbIndex) missed are found: the new paths are what finds them."""
  found, _, _ = matched
  fam = data["family"]
  old = neardup.ThumbIndex(data["ev"]).match(data["copies"])
  old_found = (old.similarity >= neardup.DEFAULT_THRESHOLD) & (old.index == data["source"])
  for f in ("caption", "letterbox", "pad_square", "rotate", "perspective"):
    sel = fam == f
    assert found[sel].mean() >= old_found[sel].mean() + 0.5, (f, found[sel].mean())


def test_pairs_within_a_set(data):
  rng = np.random.default_rng(0)
  ev = data["ev"][:10]
  extra = [webcopy.web_copy(ev[2], "crop", rng), webcopy.web_copy(ev[5], "caption", rng)]
  pairs = neardup.near_duplicate_pairs(ev + extra)
  got = {tuple(p) for p in pairs.tolist()}
  assert (2, 10) in got and (5, 11) in got, got
  assert all(j >= 10 for _, j in got), got  # the distinct tiles are not paired


def test_blocks_searched_in_any_order_merge_to_the_same(data):
  """The stage's search is a function of one block plus a merge (any executor)."""
  from bssl.stages import eval_copies

  ev = data["ev"][:12]
  indexes = [(0, np.arange(100, 112), neardup.Index(ev))]
  rng = np.random.default_rng(1)
  u = [
      (i, webcopy.web_copy(ev[i % 12], "crop", rng) if i % 3 == 0 else planted.scene(i, 128))
      for i in range(30)
  ]
  blocks = [u[a : a + 7] for a in range(0, 30, 7)]
  one = eval_copies.merge(eval_copies.search_block(indexes, b) for b in blocks)
  other = eval_copies.merge(eval_copies.search_block(indexes, b) for b in blocks[::-1])
  for k in one:
    np.testing.assert_array_equal(one[k], other[k])
  copies = set(range(0, 30, 3))
  assert set(one["id"].tolist()) <= copies and len(one["id"]) >= 8, one["id"]
  assert (one["match"] == 100 + one["id"] % 12).all()


def test_fine_views_rendered_once_score_as_rendered_per_candidate(data):
  """ThumbIndex keeps each evaluation image's fine views as uint8 renders and their inverse
  norms; a query's scores against them are the correlations with the unit views rendered
  on demand as the method did before (Pillow's renders, mean removed, unit norm)."""
  index = neardup.ThumbIndex(data["ev"][:6])
  q = neardup._query(neardup.grey(data["copies"][0]))[1]
  for e in range(6):
    views = index.renders[e].astype(np.float32)
    ref = neardup._unit(views)
    np.testing.assert_allclose(index._scores(q, e), q @ ref.T, atol=2e-6)
    np.testing.assert_allclose(index._fine_of(e, 7), ref[7], atol=2e-6)
    # and the renders are Pillow's own at the crops of the module doc
    im = index.thumbs[e]
    w, h = im.size
    cw, ch = neardup.SIDES[1] * w, neardup.SIDES[1] * h
    own = im.resize((neardup.FINE,) * 2, Image.BILINEAR, box=(0, 0, cw, ch))
    assert (index.renders[e, 1] == np.asarray(own).reshape(-1)).all()


def test_trim_borders_cuts_caption_bands_bars_and_padding_exactly(data):
  """A caption band (text in it), letterbox bars and padding to a square go, to 2 px, on
  most tiles; a tile with nothing added mostly keeps its size."""
  exact = {"caption": 0, "letterbox": 0, "pad_square": 0}
  for i, img in enumerate(data["ev"]):
    for f in exact:
      c = webcopy.web_copy(img, f, np.random.default_rng(100 + i))
      g = neardup._grey_u8(c)
      t = neardup.trim_borders(g)
      if f == "caption":
        band = c.shape[0] - img.shape[0]
        exact[f] += abs(g.shape[0] - t.shape[0] - band) <= 2 and t.shape[1] == g.shape[1]
      else:  # (padding may follow a stretch: the trimmed aspect is the source's or stretched)
        exact[f] += t is not g
  n = len(data["ev"])
  assert all(v >= 0.75 * n for v in exact.values()), (exact, n)
  kept = [neardup.trim_borders(neardup._grey_u8(x)).shape == x.shape[:2] for x in data["ev"]]
  assert np.mean(kept) >= 0.7, np.mean(kept)


def test_an_overlay_is_found_by_the_cells_the_whole_thumbnail_misses(data):
  """Text or a sticker over a textured tile lowers the whole thumbnail's correlation below
  the threshold; 70% of its cells still agree (cell_agreement): a copy. The other tiles of
  the same photographs, matched to their best evaluation tile, do not agree so."""
  index = neardup.ThumbIndex(data["ev"])
  rng = np.random.default_rng(5)
  saved = 0
  for i, img in enumerate(data["ev"]):
    for f in ("text", "sticker"):
      c = webcopy.web_copy(img, f, rng)
      m = index.match([c], gate=neardup.COARSE_GATE)
      if m.index[0] == i and neardup.CELL_GATE <= m.similarity[0] < neardup.DEFAULT_THRESHOLD:
        saved += index.cell_similarity(m.query[0], i, m.view[0]) >= neardup.CELL_THRESHOLD
  assert saved >= 10, saved
  clean = data["clean"][:120]
  m = index.match(clean, gate=neardup.COARSE_GATE)
  agree = [
      index.cell_similarity(m.query[k], m.index[k], m.view[k]) >= neardup.CELL_THRESHOLD
      for k in range(len(clean))
      if m.similarity[k] >= neardup.CELL_GATE
  ]
  assert np.mean(agree) <= 0.01, np.sum(agree)


def test_inverted_lists_beyond_the_exact_size_still_find_copies(data, monkeypatch):
  """Beyond EXACT_CODES the ORB codes go into inverted lists whose centroids are codes drawn
  at random (no training): the local path still finds crops and rotations through them."""
  monkeypatch.setattr(neardup, "EXACT_CODES", 1000)
  monkeypatch.setattr(neardup, "CODES_PER_LIST", 64)
  ev = data["ev"][:16]
  index = neardup.Index(ev)
  assert index.codes.ntotal > 1000 and hasattr(index.codes, "nprobe")
  rng = np.random.default_rng(2)
  found = 0
  for i, img in enumerate(ev):
    for f in ("crop", "rotate"):
      v = index._local(webcopy.web_copy(img, f, rng), first=True)
      found += bool(v) and v[0].index == i
  assert found >= 0.75 * 2 * len(ev), found


def test_an_evaluation_set_beyond_half_the_memory_is_refused_with_its_figures():
  from bssl.data import sources
  from bssl.stages import eval_copies

  eval_copies.check_memory(2_000, available=4 << 30)  # 0.3 GiB of 4: fine
  with pytest.raises(sources.DataError) as e:
    eval_copies.check_memory(50_000, available=8 << 30)  # ImageNet val: ~8.2 GiB of 8
  msg = str(e.value)
  assert "50,000 evaluation images" in msg and "8.2 GiB" in msg and "8.0 GiB" in msg, msg
  assert "score.eval_copies=off" in msg


@pytest.fixture(scope="module")
def retina():
  """Retina's evaluation tiles, its other tiles, and those transformed by 6 families (the
  look-alikes), with the state of their random draws after them."""
  ev, names, clean, clean_names = webcopies.tiles(webcopies.photos(), 0)
  ev = [e for e, n in zip(ev, names) if n.startswith("retina")]
  clean = [c for c, n in zip(clean, clean_names) if n.startswith("retina")]
  rng = np.random.default_rng(0)
  families = ("jpeg", "blur", "color", "downscale", "letterbox", "aspect")
  look = [webcopy.web_copy(c, f, rng) for c in clean for f in families]
  return ev, clean, families, look, rng.bit_generator.state


def test_smooth_look_alikes_are_checked_in_detail(retina):
  """Retina's tiles are smooth (too few textured cells at 32x32) and look alike: transformed
  other tiles pass the whole thumbnail's threshold; checked at 64 px (detail_agreement)
  almost none is a copy, while copies of the tiles themselves are still found."""
  ev, _, families, look, state = retina
  index = neardup.Index(ev)
  rng = np.random.default_rng()
  rng.bit_generator.state = state
  passing = index.thumb.match(look).similarity >= neardup.DEFAULT_THRESHOLD
  assert passing.sum() >= 6, passing.sum()  # (what the check is for)
  assert index.match(look).copy.sum() <= 2
  copies = [webcopy.web_copy(e, f, rng) for e in ev for f in families]
  m = index.match(copies)
  found = m.copy & (m.index == np.repeat(np.arange(len(ev)), len(families)))
  assert found.mean() >= 0.9, found.mean()


def test_smooth_look_alikes_are_not_paired_within_a_set(retina):
  """The same detail check within one set (near-duplicates within U, for D̂): retina tiles
  and transformed other tiles of it are mostly not paired (12 such pairs without the
  check), while the copies of one tile pair with each other."""
  ev, clean, families, look, _ = retina
  pairs = neardup.near_duplicate_pairs(ev + look).tolist()
  n, k = len(ev), len(families)
  across = [(a, b) for a, b in pairs if a < n <= b]
  assert len(across) <= 6, across
  same_tile = [(a, b) for a, b in pairs if a >= n and (a - n) // k == (b - n) // k]
  assert len(same_tile) >= 0.8 * len(clean) * k * (k - 1) / 2, len(same_tile)


def test_smooth_pictures_matched_by_their_faint_corners(retina):
  """Retina's tiles are smooth: ORB finds fewer than neardup.FEW keypoints at its usual
  threshold, so they are looked for again at neardup.FAINT. Rotations, perspective and 60%
  crops of them are then found by the local path alone (10 of 18 without the faint corners,
  measured 2026-12-08; 18 with them)."""
  ev = retina[0]
  index = neardup.Index(ev)
  assert (index.needed == neardup.FAINT_ALIGNED).sum() >= len(
      index.needed
  ) // 2, index.needed  # (views: image, mirror)
  rng = np.random.default_rng(0)
  found = 0
  for i, e in enumerate(ev):
    for family in ("rotate", "perspective", "crop"):
      v = index._local(webcopy.web_copy(e, family, rng), first=True)
      found += bool(v) and v[0].index == i
  assert found >= 17, found


def test_look_alikes_sharing_only_the_large_shapes_are_checked_at_64_px():
  """An edge tile of the retina (the benchmark's seed 2: retina[3,0]) is, mirrored, the shape
  of another (retina[3,3]: the orange disc's rim over the black surround) with other vessels:
  their thumbnails correlate 0.99 and the textured cells agree at 32x32 (the rim). Checked
  at 64 px (DETAIL_AGREEMENT), where the vessels differ, they are not copies (measured
  2026-12-08: 1 of these 20 look-alikes, 17 without the check); copies of retina[3,3]
  itself are still found (measured 20 of 20). Bounds with one image of slack. (Blurred or brought to 0.3x, the look-alike has no vessels left:
  it is then the rim alone, like a blurred copy, and is still paired: docs/webdataset.md.)"""
  ev, names, clean, clean_names = webcopies.tiles(webcopies.photos(), 2)
  ev = [e for e, n in zip(ev, names) if n.startswith("retina")]
  target = [n for n in names if n.startswith("retina")].index("retina[3,3]")
  edge = clean[clean_names.index("retina[3,0]")]
  index = neardup.Index(ev)
  rng = np.random.default_rng(0)
  families = ("aspect", "sharpen", "grey_mirror", "caption", "letterbox")
  look = [webcopy.web_copy(edge, f, rng) for f in families for _ in range(4)]
  m = index.match(look)
  assert m.copy.sum() <= 2, (m.copy, m.path)
  # what the check is for: without it, 17 of the 20 were called copies of retina[3,3]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(neardup, "DETAIL_AGREEMENT", -2.0)
    before = index.match(look)
  assert (before.copy & (before.index == target)).sum() >= 12, before.copy
  copies = [webcopy.web_copy(ev[target], f, rng) for f in families for _ in range(4)]
  m = index.match(copies)
  assert (m.copy & (m.index == target)).sum() >= len(copies) - 1, (m.copy, m.index)


def test_pairs_within_a_set_are_the_same_on_any_number_of_threads():
  """near_duplicate_pairs on 3 threads equals 1 thread, and an image's search against its
  own set with the index's description of it (own=True) equals describing it again."""
  rng = np.random.default_rng(4)
  imgs = []
  for f in range(12):
    base = planted.scene(f, size=96)
    imgs += [base] + [
        webcopy.web_copy(base, webcopy.FAMILIES[int(rng.integers(len(webcopy.FAMILIES)))], rng)
        for _ in range(2)
    ]
  one = neardup.near_duplicate_pairs(imgs, threads=1)
  assert len(one) >= 12, one  # (most families paired)
  assert np.array_equal(one, neardup.near_duplicate_pairs(imgs, threads=3))
  index = neardup.Index(imgs, threads=1)
  verdicts = 0
  for i in range(len(imgs)):
    a = index._local(imgs[i], exclude=i, own=True)
    b = index._local(imgs[i], exclude=i)
    assert [(v.index, v.inliers, v.similarity) for v in a] == [
        (v.index, v.inliers, v.similarity) for v in b
    ], i
    verdicts += len(a)
  assert verdicts >= 6, verdicts  # (the local path did decide some)
