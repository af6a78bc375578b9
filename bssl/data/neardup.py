"""Near-duplicates of evaluation images in U: copies of test / validation images as the web
makes them (resized, cropped to 60% of the area, JPEG at quality 10, re-coloured, mirrored,
blurred, a caption band on top, text or a sticker over it, letterboxed or padded to a square,
rotated by 10 degrees, in perspective, and pairs of these), which a teacher labels right and a
student then memorises, so that the test accuracy is inflated. No model weights.

:class:`Index` decides by two paths; a U image is a copy when either says so.

1. **Aligned thumbnails** (:class:`ThumbIndex`, the method of bssl <= 0.4). Every evaluation
   image is described by six coarse views (the whole image, the centre 90%, the four corner
   90% crops: 16x16 grey, mean removed, unit norm) and :data:`VIEWS` fine views (32x32
   renders of a grid of crops, side 100% to 88%, 5x5 positions: rendered once, when the
   index is built); the ``candidates`` of highest cosine similarity to a U image or its
   mirror image (exact products, or faiss's HNSW graph of the views beyond
   :data:`EXACT_VIEWS`), of coarse similarity at least :data:`COARSE_GATE`, have their fine
   views correlated with the U image; the best correlation is the *similarity*, a copy from
   ``threshold`` (``score.copy_threshold``, 0.95). The same on the U image with its borders
   trimmed (:func:`trim_borders`: letterbox bars, padding, a caption band). Where the
   similarity is at least :data:`CELL_GATE` but below the threshold, the best pair of views
   is compared cell by cell (:func:`cell_agreement`: 70% of the textured 8x8 cells,
   each less its plane, correlate at least :data:`CELL_THRESHOLD`): a text, a sticker or
   a band over the picture spoils the cells it covers, not the others. Every match must
   also agree at 64 px (:meth:`ThumbIndex.detail_agreement`, cell by cell):
   :data:`DETAIL_AGREEMENT` (:data:`CELLS_DETAIL` for a match by the cells,
   :data:`SMOOTH_AGREEMENT` where too few cells have texture at 32x32): look-alikes that
   share the large shapes only (a retina's edge tile and the mirror image of another,
   photo-like scenes sharing two shapes and the background) correlate at 32x32, not at 64.
   Finds resizing, aspect, JPEG, colour, grey, mirror, blur, sharpening; overlays;
   trimmed, letterbox, padding, caption bands.
2. **Local features** for what the first path does not find. ORB keypoints (at most
   :data:`NFEATURES`, image brought to :data:`SIDE` px; a third the strongest, the rest
   spread over the image, :func:`_spread`, so that an overlay's text does not take them
   all; a smooth picture's faint corners where it has fewer than :data:`FEW`) of every
   evaluation image and of its mirror image in a faiss index of binary
   codes (exact, or inverted lists beyond :data:`EXACT_CODES` codes,
   :func:`_binary_index`); the U image's codes vote for the images they are near; the
   :data:`CANDIDATE_VIEWS` most voted are verified: ratio-tested matches, an affine RANSAC
   gate, a homography (USAC) with at least :data:`MIN_INLIERS` inliers, then the U image
   mapped onto the evaluation image and compared pixel by pixel (:func:`aligned_similarity`:
   the median correlation of 8x8 cells at 64x64, at least :data:`ALIGNED_THRESHOLD` —
   :data:`FAINT_ALIGNED` for faint keypoints, :data:`SMALL_ALIGNED` under 48 px — and
   its 30th percentile at least :data:`LOW_ALIGNED`, so an overlay spoils a few cells, not
   the verdict). Finds crops, rotations, perspective,
   overlays, bands, padding — geometry a global descriptor cannot undo — and rejects
   look-alikes, whose matches have no common geometry or whose pixels differ once aligned.

Why not a perceptual hash: a 64-bit hash of the whole image changes under a crop, a band or
padding (measured beside this method in benchmarks/webcopies.py); and a learned class
feature maps different images of one class together, the opposite of telling a copy from a
look-alike.

Cost (docs/webdataset.md has the measured figures): per evaluation image about
:data:`BYTES_PER_IMAGE` (thumbnail, coarse views, the ORB points and codes of it and its
mirror image, a 64-px copy for the pixel check, the 101 fine views rendered once); per U
image one ORB extraction, one search of ~300 codes, up to 8 candidates' fine views compared
and up to 3 geometric verifications. :func:`near_duplicate_pairs`
finds the pairs of copies within one set (near-duplicates within U, for D̂).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import threading

import cv2
import faiss
import numpy as np
import threadpoolctl
from PIL import Image

from bssl import deps, procs

COARSE = 16
FINE = 32
KEEP = 64  # side of the grey thumbnail kept per evaluation image
SIDES = (1.0, 0.97, 0.94, 0.91, 0.88)
STEPS = 5
VIEWS = 1 + (len(SIDES) - 1) * STEPS * STEPS  # fine views (crops) rendered per evaluation image
CELL_THRESHOLD = 0.85  # Index: a copy by its best-aligned thumbnail's cells (cell_similarity)
CELL_QUANTILE = 30  # ... this percentile of the cells' correlations (70% of cells alike)
CELL_GATE = 0.5  # ... tried where the whole thumbnail correlates at least this much
MIN_CELLS = 6  # textured 8x8 cells (of 16) cell_agreement needs
SMOOTH_AGREEMENT = 0.3  # a smooth thumbnail match (too few textured cells) at 64 px
DETAIL_AGREEMENT = 0.12  # a textured thumbnail match at 64 px too (see Index._detail_holds)
CELLS_DETAIL = 0.2  # ... and a match by the cells
AFTER = 0.9  # trim_borders: the first picture line is less than this share of the border colour
DEFAULT_THRESHOLD = 0.95  # = score.copy_threshold's default; measured: docs/webdataset.md
# the local path (measured: benchmarks/webcopies.py, docs/webdataset.md)
SIDE = 256  # images described at this longer side
MIN_LOCAL_SIDE = 32  # smaller images (a side in px) have no local features: the thumbnails
# path alone (ORB on a 28-px image brought to 256 px pairs unrelated blobs)
SMALL_SIDE = 48  # smaller ones (brought up 5x or more) must agree at SMALL_ALIGNED once
SMALL_ALIGNED = 0.85  # aligned: 32-px random noise (resnext:tiny's fake data) paired at 0.76
CHECK_SIDE = 64  # and compared pixel by pixel at this one
NFEATURES = 300  # ORB keypoints per image at most: of DETECTED times as many found, the
DETECTED = 4  # STRONGEST share by strength, the rest spread over a GRID x GRID partition
STRONGEST = 1 / 3  # (measured: all by strength, an overlay's text took the budget: text and
GRID = 6  # sticker copies 0.85 found; all spread, the photo-like scenes lost 1%)
FEW = 100  # fewer keypoints than this (a smooth picture: retina, a clock face) and ORB looks
FAINT = 2  # again at this FAST threshold (7 otherwise); a match where either side is so
FAINT_ALIGNED = 0.9  # faint must agree this well once aligned (brick and clock tiles passed
# at 0.75: faint corners of structured look-alikes line up)
VOTE_DISTANCE = 64  # Hamming distance (of 256 bits) at which a code votes for its image
MIN_VOTES = 6
CANDIDATE_VIEWS = 3  # views (an evaluation image or its mirror image) verified per U image
MIN_INLIERS = 10  # homography inliers (RANSAC, 5 px at SIDE)
ALIGNED_THRESHOLD = 0.75  # median 8x8-cell correlation after alignment (at CHECK_SIDE; at 0.7
# another tile of a brick wall passed: its mortar lines line up under a shift)
ALIGNED_QUANTILE = 50  # (the median)
LOW_QUANTILE = 30  # and 70% of those cells at least LOW_ALIGNED: photo-like look-alikes
LOW_ALIGNED = 0.35  # sharing two shapes and the background agreed in the median only
EXACT_CODES = 20_000  # above: inverted lists
CODES_PER_LIST = 256  # inverted lists: about this many codes each (at most MAX_LISTS lists)
MAX_LISTS = 1 << 16
EXACT_VIEWS = 60_000  # coarse views; above: an HNSW graph
COARSE_GATE = 0.5  # Index: candidates of lower coarse similarity are not verified
PROBES = 2  # inverted lists searched per code (measured: 4 found 0.2% more copies, 20% slower)
QUANTIZER_EF = 8  # HNSW breadth of the lists' graph (its search is most of a U image's search)
# an evaluation image in Index (measured 173 KB at |E| = 50,060 on 2026-12-08: docs/webdataset.md)
BYTES_PER_IMAGE = 172 * 1024
PATHS = ("thumb", "trimmed", "cells", "local")  # Match.path: the thumbnails, on the image or
# with its borders trimmed; their cells; the local features
# The matcher's version, noted in the record of every stage that keeps its answers
# (bssl/deps.py, note_method): changed with any change of which images it calls copies, so
# that a workdir matched by an earlier one is found stale, not silently kept or mixed.
# 2026-12-08.2: keypoints spread over the image, faint ones for smooth pictures, the pixel
# check at 64 px, local features from 32 px
# 2026-12-08.3: every thumbnail match checked at 64 px; the local path's 30th percentile
# 2026-12-08.4: the check at 64 px counts the cells with texture on both sides
METHOD = "2026-12-08.4"
deps.register_method("neardup", METHOD)
cv2.setNumThreads(1)  # the stage runs one matching thread per core itself
faiss.omp_set_num_threads(1)  # (this thread's: OpenMP's count is per thread, see _this_thread)
_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved = None
_numpy_blas = None


@contextlib.contextmanager
def _one_blas_thread():
  """numpy's BLAS on one thread while any thread of the process matches (the matching runs
  one thread per core itself; OpenBLAS's own threads spun on its small products: measured
  on 2 cores, a within-set search took 15.7 ms of CPU an image with them, 9.1 without).
  Counted, so that threads entering and leaving in any order restore the limits once. Only
  a BLAS with threads of its own (pthreads): an OpenMP one (faiss's) takes its count per
  calling thread, which _this_thread sets."""
  global _blas_users, _blas_saved, _numpy_blas
  with _blas_lock:
    if _blas_users == 0:
      if _numpy_blas is None:
        _numpy_blas = threadpoolctl.ThreadpoolController().select(
            user_api="blas", threading_layer=["pthreads", "tbb", "intel"]
        )
      _blas_saved = _numpy_blas.limit(limits=1)
    _blas_users += 1
  try:
    yield
  finally:
    with _blas_lock:
      _blas_users -= 1
      if _blas_users == 0:
        _blas_saved.restore_original_limits()
        _blas_saved = None


def _threads(threads: int | None) -> int:
  """``threads``, or by default the cores this process may use (:func:`bssl.procs.num_cores`:
  a Slurm task's CPUs, not the host's)."""
  return max(1, int(threads if threads is not None else procs.num_cores()))


def _single_blas(fn):
  @functools.wraps(fn)
  def run(*args, **kwargs):
    with _one_blas_thread():
      return fn(*args, **kwargs)

  return run


def grey(img: np.ndarray) -> Image.Image:
  """A uint8 HxW, HxWx1 or HxWx3 image as a Pillow grey image."""
  a = np.asarray(img)
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[..., 0]
  im = Image.fromarray(a.astype(np.uint8))
  return im.convert("L") if im.mode != "L" else im


def _unit(a: np.ndarray) -> np.ndarray:
  a = a.reshape(len(a), -1).astype(np.float32)
  a -= a.mean(1, keepdims=True)
  return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-6)


def _coarse_views(im: Image.Image) -> np.ndarray:
  w, h = im.size
  boxes = [
      (0, 0, w, h),
      (0.05 * w, 0.05 * h, 0.95 * w, 0.95 * h),
      (0, 0, 0.9 * w, 0.9 * h),
      (0.1 * w, 0, w, 0.9 * h),
      (0, 0.1 * h, 0.9 * w, h),
      (0.1 * w, 0.1 * h, w, h),
  ]
  return _unit(
      np.stack(
          [np.asarray(im.resize((COARSE, COARSE), Image.BOX, box=b), np.float32) for b in boxes]
      )
  )


def _fine_renders(im: Image.Image) -> np.ndarray:
  """The :data:`VIEWS` fine views of a thumbnail as Pillow renders them: uint8 [VIEWS, 1024]
  (the crops of :func:`_view_box`, at 32x32)."""
  w, h = im.size
  return np.stack(
      [
          np.asarray(im.resize((FINE, FINE), Image.BILINEAR, box=_view_box(w, h, v))).reshape(-1)
          for v in range(VIEWS)
      ]
  ).astype(np.uint8)


def _view_box(w: float, h: float, view: int) -> tuple[float, float, float, float]:
  """The crop of a ``w`` x ``h`` thumbnail that fine view ``view`` renders: the whole, then
  crops of side :data:`SIDES` [1:] at 5x5 positions each, rows of positions top to bottom."""
  if view == 0:
    return (0.0, 0.0, float(w), float(h))
  s = SIDES[1 + (view - 1) // (STEPS * STEPS)]
  k = (view - 1) % (STEPS * STEPS)
  oy, ox = np.linspace(0.0, 1.0, STEPS)[k // STEPS], np.linspace(0.0, 1.0, STEPS)[k % STEPS]
  cw, ch = s * w, s * h
  x0, y0 = ox * (w - cw), oy * (h - ch)
  return (x0, y0, x0 + cw, y0 + ch)


def _inverse_norms(r: np.ndarray) -> np.ndarray:
  """1 / the norm of each render less its mean (float32 [VIEWS]): a unit query (mean removed)
  times a render, times this, is their correlation."""
  a = r.astype(np.float32)
  a -= a.mean(1, keepdims=True)
  return (1.0 / (np.linalg.norm(a, axis=1) + 1e-6)).astype(np.float32)


def _plane_residual() -> np.ndarray:
  yy, xx = np.mgrid[0:8, 0:8]
  x = np.stack([np.ones(64), xx.ravel(), yy.ravel()], 1)
  return (np.eye(64) - x @ np.linalg.pinv(x)).astype(np.float32)


_PLANE = _plane_residual()  # an 8x8 cell less its best-fitting plane (a symmetric projection)


def cell_agreement(q: np.ndarray, f: np.ndarray) -> float:
  """The :data:`CELL_QUANTILE` percentile of the correlations of the 16 8x8 cells of two
  32x32 views (flattened, as
  ``_fine_of`` and ``_query`` make them), each cell less its best-fitting plane (a smooth
  ramp, the whole of a cell of a smooth photograph, correlates with any other ramp of its
  direction), over the cells of ``f`` whose residual has texture (a norm at least a quarter
  of the view's mean cell's); -1 with fewer than :data:`MIN_CELLS` such cells."""
  a = q.reshape(4, 8, 4, 8).transpose(0, 2, 1, 3).reshape(16, 64) @ _PLANE
  b = f.reshape(4, 8, 4, 8).transpose(0, 2, 1, 3).reshape(16, 64) @ _PLANE
  na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
  ok = (nb >= 0.25 * np.linalg.norm(f - f.mean()) / 4) & (na > 1e-9)
  if ok.sum() < MIN_CELLS:
    return -1.0
  return float(np.percentile((a[ok] * b[ok]).sum(1) / (na[ok] * nb[ok]), CELL_QUANTILE))


def _query(im: Image.Image):
  """(coarse [2, 256], fine [2, 1024]) of an image and its mirror image."""
  flip = im.transpose(Image.FLIP_LEFT_RIGHT)
  c = _unit(
      np.stack([np.asarray(x.resize((COARSE, COARSE), Image.BOX), np.float32) for x in (im, flip)])
  )
  f = _unit(
      np.stack([np.asarray(x.resize((FINE, FINE), Image.BILINEAR), np.float32) for x in (im, flip)])
  )
  return c, f


def _thumb_parts(img):
  """An evaluation image's part of :class:`ThumbIndex`: its thumbnail (at most
  :data:`KEEP` px), coarse views, fine renders and their inverse norms."""
  im = grey(img)
  im = im.resize((KEEP, KEEP), Image.BOX) if max(im.size) > KEEP else im
  r = _fine_renders(im)
  return im, _coarse_views(im), r, _inverse_norms(r)


@dataclasses.dataclass
class Match:
  similarity: np.ndarray  # [n] float32: best similarity to any evaluation image
  index: np.ndarray  # [n] int64: position of that image in the index (-1: none)
  copy: np.ndarray | None = None  # [n] bool: a copy (Index; ThumbIndex: similarity >= 0.95)
  inliers: np.ndarray | None = None  # [n] int64: local path's geometric inliers (0: not used)
  view: np.ndarray | None = None  # [n] int64: ThumbIndex: the best pair of views (see match)
  query: np.ndarray | None = None  # [n, 2, 1024] ThumbIndex: the queries' fine rows (_query)
  path: np.ndarray | None = None  # [n] str: Index: which path decided a copy (PATHS; "": none)


class ThumbIndex:
  """The previous method (bssl <= 0.4: the stage of the candidates below): the evaluation images, ready to be matched against U (see the module doc). ``match``
  may be called from several threads at once (Pillow's resize and numpy's products
  release the GIL)."""

  @_single_blas
  def __init__(self, images, candidates: int = 8, threads: int | None = None):
    self.candidates = int(candidates)
    self.n = len(images)
    self.thumbs = []
    self.coarse = np.zeros((self.n * 6, COARSE * COARSE), np.float32)
    # every fine view rendered once, here (uint8, ~101 KiB an image): rendering them for each
    # candidate of each U image cost 8 ms a candidate, most of a U image's time at |E| = 50,000
    self.renders = np.zeros((self.n, VIEWS, FINE * FINE), np.uint8)
    self.inverse_norms = np.zeros((self.n, VIEWS), np.float32)
    threads = _threads(threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for e, (im, c, r, inv) in enumerate(pool.map(_thumb_parts, images)):
        self.thumbs.append(im)
        self.coarse[6 * e : 6 * e + 6], self.renders[e], self.inverse_norms[e] = c, r, inv
    self._graph = None
    if len(self.coarse) > EXACT_VIEWS:
      self._graph = faiss.IndexHNSWFlat(COARSE * COARSE, 32, faiss.METRIC_INNER_PRODUCT)
      self._graph.hnsw.efSearch = 128
      faiss.omp_set_num_threads(threads)
      try:
        self._graph.add(self.coarse)
      finally:
        faiss.omp_set_num_threads(1)

  def _scores(self, q: np.ndarray, e: int) -> np.ndarray:
    """Correlations of unit queries ``q`` [k, 1024] with the fine views of image ``e``."""
    return (q @ self.renders[e].T.astype(np.float32)) * self.inverse_norms[e]

  def _fine_of(self, e: int, view: int) -> np.ndarray:
    """One fine view of image ``e``, mean removed, unit norm (float32 [1024])."""
    a = self.renders[e, view].astype(np.float32)
    return (a - a.mean()) * self.inverse_norms[e, view]

  @_single_blas
  def match(self, images, block: int = 256, gate: float = -2.0) -> Match:
    """The best similarity of each of ``images`` to the evaluation images (candidates of
    coarse similarity below ``gate`` not verified)."""
    images = list(images)
    sim = np.full(len(images), -1.0, np.float32)
    idx = np.full(len(images), -1, np.int64)
    view = np.full(len(images), -1, np.int64)
    query = np.zeros((len(images), 2, FINE * FINE), np.float32)
    if self.n == 0:
      return Match(sim, idx, view=view, query=query)
    for a in range(0, len(images), block):
      qs = [_query(grey(x)) for x in images[a : a + block]]
      query[a : a + len(qs)] = [q[1] for q in qs]
      cand, score = self._candidates(np.stack([q[0] for q in qs]))
      for r, (q, cs, ss) in enumerate(zip(qs, cand, score)):
        best, arg, at = -1.0, -1, -1
        for e, c in zip(cs, ss):
          if c < gate or e < 0:
            continue
          s = self._scores(q[1], int(e))  # [2 (the image, its mirror), views]
          j = int(s.argmax())
          if s.flat[j] > best:
            best, arg, at = float(s.flat[j]), int(e), j
        sim[a + r], idx[a + r], view[a + r] = best, arg, at
    return Match(sim, idx, view=view, query=query)

  def detail_agreement(self, img, e: int, at: int) -> float | None:
    """At 64 px (or the smaller side of either), how alike ``img`` and the crop of evaluation
    image ``e``'s thumbnail that view ``at`` renders are, cell by cell (8x8 cells less their
    planes, the median correlation of those with texture in both: a residual of at least
    one grey level — a cell the copy's JPEG or blur flattened is no evidence either way);
    None where fewer than 4 cells have texture. (Counting the flattened cells, JPEG'd
    copies of smooth photo-like scenes failed the smooth check: 1% of their recall.)"""
    im = grey(img)
    if at // VIEWS:
      im = im.transpose(Image.FLIP_LEFT_RIGHT)
    t = self.thumbs[e]
    side = min(KEEP, *im.size, *t.size) // 8 * 8
    if side < 16:
      return None
    q = np.asarray(im.resize((side, side), Image.BOX), np.float32)
    f = np.asarray(
        t.resize((side, side), Image.BILINEAR, box=_view_box(*t.size, at % VIEWS)), np.float32
    )
    n = side // 8

    def cells(a):
      return a.reshape(n, 8, n, 8).transpose(0, 2, 1, 3).reshape(n * n, 64) @ _PLANE

    a, b = cells(q), cells(f)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (nb >= 8.0) & (na >= 8.0)
    if ok.sum() < 4:
      return None
    return float(np.median((a[ok] * b[ok]).sum(1) / (na[ok] * nb[ok])))

  def cell_similarity(self, q: np.ndarray, e: int, at: int) -> float:
    """How alike a query (``q``: its fine rows, ``Match.query``) and evaluation image ``e``
    are where they are alike: at the pair of views ``at`` (``Match.view``: the U image or
    its mirror image, and a crop of ``e``),
    :func:`cell_agreement` of the two (-1: too few textured cells). A text or a sticker over
    the picture spoils the cells it covers and the correlation of the whole, not 70% of the
    cells; a look-alike sharing some shapes with ``e`` agrees in fewer."""
    return cell_agreement(q[at // VIEWS], self._fine_of(int(e), at % VIEWS))

  def _candidates(self, c: np.ndarray, k: int | None = None):
    """The ``k`` (default ``candidates``) evaluation images of highest coarse similarity
    to each query ([b, 2, 256]: an image and its mirror image) and those similarities: an
    exact product up to :data:`EXACT_VIEWS` views, else faiss's HNSW graph of the views."""
    b, nv = len(c), len(self.coarse) // self.n
    k = min(self.candidates if k is None else k, self.n)
    if self._graph is None:
      s = (c.reshape(-1, c.shape[-1]) @ self.coarse.T).reshape(b, 2, self.n, nv)
      s = s.max(axis=(1, 3))  # [b, n]
      cand = np.argpartition(-s, k - 1, axis=1)[:, :k]
      return cand, np.take_along_axis(s, cand, axis=1)
    _this_thread()
    dist, ids = self._graph.search(np.ascontiguousarray(c.reshape(-1, c.shape[-1])), k * nv)
    cand = np.full((b, k), -1, np.int64)
    score = np.full((b, k), -2.0, np.float32)
    for r in range(b):
      owner, sims = ids[2 * r : 2 * r + 2].ravel() // nv, dist[2 * r : 2 * r + 2].ravel()
      ok = owner >= 0
      best: dict[int, float] = {}
      for o, v in zip(owner[ok].tolist(), sims[ok].tolist()):
        if v > best.get(o, -2.0):
          best[o] = v
      top = sorted(best.items(), key=lambda t: -t[1])[:k]
      cand[r, : len(top)] = [t[0] for t in top]
      score[r, : len(top)] = [t[1] for t in top]
    return cand, score

  def copies_of(self, query, exclude: int = -1, threshold: float = DEFAULT_THRESHOLD):
    """Every candidate evaluation image (``exclude`` left out) whose aligned similarity to
    the image of ``query`` (its :func:`_query`) reaches ``threshold``, with its best pair
    of views (as ``Match.view``): a dict."""
    if self.n < 2:
      return {}
    cand, _ = self._candidates(query[0][None], self.candidates + 1)  # (one may be ``exclude``)
    cand = [int(e) for e in cand[0] if e >= 0 and e != exclude][: self.candidates]
    scores = {e: self._scores(query[1], e) for e in cand}
    return {e: int(s.argmax()) for e, s in scores.items() if float(s.max()) >= threshold}


def _grey_u8(img) -> np.ndarray:
  a = np.asarray(img)
  if a.ndim == 3 and a.shape[2] == 3:
    return cv2.cvtColor(np.ascontiguousarray(a, np.uint8), cv2.COLOR_RGB2GRAY)
  return np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1]), np.uint8)


def trim_borders(g: np.ndarray, tol: int = 16, most: float = 0.45):
  """``g`` (grey uint8) without its borders: letterbox bars, padding to a square, a caption
  band with lines of text in it. On each side, a border is a run of edge lines that starts
  and ends with a *pure* line (95% of its pixels within ``tol`` of the first line's median),
  whose lines are on average 70% of that colour or of its opposite extreme (a caption's
  black-on-white or white-on-black text), and after which the picture begins (a line less
  than 90% so); the longest such run of at most ``most`` of the image goes. A photograph
  whose own sky or shadow runs on (no edge where the border would end) is left whole, as is
  the image when nothing would go."""
  h, w = g.shape

  def lead(a, n):
    lim = int(most * n)
    rows = a[: lim + 2].astype(np.int16)
    ref = int(np.median(rows[0]))
    ink = 255 - ref if ref < 64 or ref > 191 else -1000
    same = np.abs(rows - ref) <= tol
    near = (same | (np.abs(rows - ink) <= tol)).mean(axis=1)
    pure = same.mean(axis=1) >= 0.95
    if not pure[0]:
      return 0
    mean = np.cumsum(near) / np.arange(1, len(near) + 1)
    after = np.append(near[1:], 1.0)
    ends = np.flatnonzero(pure & (mean >= 0.7) & (after < AFTER)) + 1
    ends = ends[ends <= lim]
    return int(ends[-1]) if len(ends) else 0

  t, b, left, r = lead(g, h), lead(g[::-1], h), lead(g.T, w), lead(g.T[::-1], w)
  if (t, b, left, r) == (0, 0, 0, 0) or h - t - b < 0.3 * h or w - left - r < 0.3 * w:
    return g
  return g[t : h - b, left : w - r]


def _side_shape(shape: tuple[int, int], side: int) -> tuple[int, int]:
  """The (height, width) of an image of ``shape`` brought to ``side`` px (its longer side)."""
  h, w = shape
  s = side / max(h, w)
  return max(1, round(h * s)), max(1, round(w * s))


def _to_side(g: np.ndarray, side: int) -> np.ndarray:
  h, w = _side_shape(g.shape, side)
  return cv2.resize(
      g, (w, h), interpolation=cv2.INTER_AREA if side < max(g.shape) else cv2.INTER_LINEAR
  )


_tls = threading.local()


def _this_thread():
  """This thread's matching state, made once: faiss's searches on it alone (OpenMP's thread
  count is the calling thread's: a pool's threads start at every core's), its ORB detectors
  (usual and faint) and matcher."""
  t = _tls
  if getattr(t, "orb", None) is None:
    faiss.omp_set_num_threads(1)
    t.orb = cv2.ORB_create(
        nfeatures=NFEATURES * DETECTED, fastThreshold=7, edgeThreshold=15, patchSize=15
    )
    t.faint = cv2.ORB_create(
        nfeatures=NFEATURES * DETECTED, fastThreshold=FAINT, edgeThreshold=15, patchSize=15
    )
    t.bf = cv2.BFMatcher(cv2.NORM_HAMMING)
  return t


def _spread(kp, shape: tuple[int, int], n: int = NFEATURES) -> list:
  """At most ``n`` of the keypoints ``kp`` of an image of ``shape``: the :data:`STRONGEST`
  share of them by strength, then the strongest of each part of a :data:`GRID` x
  :data:`GRID` partition of the image in turn, strongest first. A text laid over a
  picture has the strongest corners of the image: kept by strength alone, its keypoints
  took the budget and the picture's were not there to match."""
  if len(kp) <= n:
    return list(kp)
  h, w = shape
  resp = np.array([k.response for k in kp], np.float64)
  pts = np.array([k.pt for k in kp], np.float64)
  row = np.minimum((pts[:, 1] * GRID / h).astype(np.int64), GRID - 1)
  col = np.minimum((pts[:, 0] * GRID / w).astype(np.int64), GRID - 1)
  part = row * GRID + col
  part[np.argsort(-resp, kind="stable")[: int(STRONGEST * n)]] = -1  # (first, any part)
  order = np.lexsort((-resp, part))  # by part, within it strongest first
  ps = part[order]
  turn = np.arange(len(order)) - np.searchsorted(ps, ps)  # place within its part
  turn[ps < 0] = -1
  pick = order[np.lexsort((-resp[order], turn))][:n]  # turn by turn, strongest first
  return [kp[i] for i in pick]


def _features(g: np.ndarray):
  """ORB keypoints (positions [n, 2]) and codes ([n, 32] uint8) of ``g`` (at most
  :data:`NFEATURES`, chosen by :func:`_spread`), strongest first, and whether they are
  faint ones (fewer than :data:`FEW` at the usual threshold: a smooth picture's)."""
  t = _this_thread()
  o = t.orb
  kp = o.detect(g, None) if g.size else ()
  faint = bool(g.size) and len(kp) < FEW
  if faint:  # a smooth picture: its faint corners too
    kp = t.faint.detect(g, None)
  kp = _spread(kp, g.shape)
  kp, d = o.compute(g, kp) if kp else ((), None)
  if d is None or not len(kp):
    return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), faint
  order = np.argsort([-k.response for k in kp], kind="stable")
  return np.float32([k.pt for k in kp])[order], np.ascontiguousarray(d[order]), faint


def _describe(img):
  """The local path's description of an evaluation image: for it and its mirror image, the
  pixel check's copy, the ORB points and the ORB codes."""
  g0 = _grey_u8(img)
  g = _to_side(g0, SIDE)
  out = []
  for v in (g, np.ascontiguousarray(g[:, ::-1])):
    p, d, faint = _features(v if min(g0.shape) >= MIN_LOCAL_SIDE else v[:0, :0])
    out.append((_to_side(v, CHECK_SIDE), p, d, _needed(g0.shape, faint)))
  return out


def _needed(shape: tuple[int, int], faint: bool) -> float:
  """The aligned similarity a local match needs on the side of an image of ``shape``:
  :data:`FAINT_ALIGNED` where its keypoints are ``faint`` ones (:func:`_features`),
  :data:`SMALL_ALIGNED` where it is under :data:`SMALL_SIDE` px, else
  :data:`ALIGNED_THRESHOLD`; a match needs the larger of its two sides'."""
  if faint:
    return FAINT_ALIGNED
  return SMALL_ALIGNED if min(shape) < SMALL_SIDE else ALIGNED_THRESHOLD


def _plausible(h: np.ndarray) -> bool:
  """Whether a homography is one a re-posted copy could have: its linear part stretches one
  direction at most 2.5 times the other (stretches up to 1.5, perspective, rotation) and
  keeps some size; a degenerate fit to a few points on one shape does not."""
  if abs(h[2, 2]) < 1e-9:
    return False
  sv = np.linalg.svd(h[:2, :2] / h[2, 2], compute_uv=False)
  return bool(sv[1] > 1e-3 and sv[0] / sv[1] <= 2.5 and 0.05 <= sv[0] * sv[1] <= 50)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
  a = a - a.mean()
  b = b - b.mean()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-6))


def aligned_similarity(query: np.ndarray, target: np.ndarray, h: np.ndarray) -> float:
  """How alike ``query`` mapped onto ``target`` by the homography ``h`` is (grey uint8
  images): over the part of ``target`` the query covers (at least 30%), its bounding box
  brought to :data:`CHECK_SIDE` px, the median of the correlations of its textured 8x8
  cells (std >= 4; at least 4 cells, fully covered) — an overlay, a band or a sticker
  spoils a few cells, not the median; -1 where too little is covered or where the
  :data:`LOW_QUANTILE` percentile is under :data:`LOW_ALIGNED` (more than 30% of the
  cells unlike: a look-alike sharing some shapes, not an overlaid copy). (At 32 px, a copy
  turned by 10 degrees left no 4 whole textured cells in its tilted frame: 26 of the
  benchmark's copies with 50-120 inliers were missed so.)"""
  th, tw = target.shape
  warped = cv2.warpPerspective(query, h, (tw, th), flags=cv2.INTER_LINEAR)
  ones = np.full(query.shape, 255, np.uint8)
  valid = cv2.warpPerspective(ones, h, (tw, th), flags=cv2.INTER_NEAREST) > 0
  if valid.mean() < 0.3:
    return -1.0
  ys, xs = np.nonzero(valid)
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  n = CHECK_SIDE

  def small(a):
    return cv2.resize(a[y0:y1, x0:x1], (n, n), interpolation=cv2.INTER_AREA).astype(np.float32)

  a, b = small(warped), small(target)
  v = small(valid.astype(np.uint8) * 255) > 254
  cells = [
      _corr(a[y : y + 8, x : x + 8][m], b[y : y + 8, x : x + 8][m])
      for y in range(0, n, 8)
      for x in range(0, n, 8)
      if (m := v[y : y + 8, x : x + 8]).mean() > 0.8 and b[y : y + 8, x : x + 8][m].std() >= 4
  ]  # (a flat cell, a sky or a painted shape, is no evidence either way)
  if len(cells) < 4:
    return -1.0
  mid, low = np.percentile(cells, [ALIGNED_QUANTILE, LOW_QUANTILE])
  return float(mid) if low >= LOW_ALIGNED else -1.0


@dataclasses.dataclass
class Verdict:
  similarity: float = -1.0
  index: int = -1
  inliers: int = 0


class Index:
  """The evaluation images, ready to be matched against U by the two paths of the module
  doc: the aligned thumbnails (:class:`ThumbIndex`, on the image and on it with its borders
  trimmed) and, for what they do not find, local features verified by geometry and pixels.
  ``match`` may be called from several threads at once."""

  @_single_blas
  def __init__(
      self,
      images,
      candidates: int = 8,
      threshold: float = DEFAULT_THRESHOLD,
      threads: int | None = None,
  ):
    images = list(images)
    self.threshold = float(threshold)
    threads = _threads(threads)
    self.thumb = ThumbIndex(images, candidates, threads)
    self.n = len(images)
    # local features of each evaluation image and of its mirror image ("views" 2e, 2e+1),
    # described on ``threads`` threads (default: a core each, _threads; OpenCV releases
    # the GIL)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      views = [v for vs in pool.map(_describe, images) for v in vs]
    self.small = [v[0] for v in views]
    self.needed = np.array([v[3] for v in views], np.float64)  # (see _needed)
    self.points = [v[1] for v in views]
    counts = np.array([len(v[2]) for v in views], np.int64)
    codes = np.concatenate([v[2] for v in views]) if views else np.zeros((0, 32), np.uint8)
    del views
    starts = np.concatenate([[0], np.cumsum(counts)])
    self.descs = [codes[a:b] for a, b in zip(starts[:-1], starts[1:])]  # (views of one array)
    self.owner = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    self.codes = _binary_index(codes, threads)

  @property
  def nbytes(self) -> int:
    """Bytes held (the thumbnails, their views, the features; not faiss's graphs)."""
    t = self.thumb
    thumbs = t.coarse.nbytes + t.renders.nbytes + t.inverse_norms.nbytes
    thumbs += sum(x.size[0] * x.size[1] for x in t.thumbs)
    local = sum(
        s.nbytes + p.nbytes + d.nbytes for s, p, d in zip(self.small, self.points, self.descs)
    )
    # (the codes are held twice: in ``descs`` and in the faiss index, with its 8-byte ids)
    return int(thumbs + local + self.owner.nbytes + self.codes.ntotal * (32 + 8))

  def _local(self, img, exclude: int = -1, first: bool = False, own: bool = False) -> list[Verdict]:
    """The verdicts of the local path on the candidate views of ``img`` (evaluation image
    ``exclude`` left out), best first; with ``first``, the first copy found (the most voted
    view that verifies) alone. ``own``: ``img`` is evaluation image ``exclude`` itself, whose
    description is the index's (not made again)."""
    bf = _this_thread().bf
    cv2.setRNGSeed(0)  # RANSAC's draws (this thread's RNG): the same verdict in any order
    g0 = _grey_u8(img)
    if min(g0.shape) < MIN_LOCAL_SIDE:
      return []
    shape = _side_shape(g0.shape, SIDE)
    if own:  # (as _describe made them: the view of the image, not its mirror)
      assert exclude >= 0, "own: img is evaluation image exclude"
      gs, p, d, needed = (
          self.small[2 * exclude],
          self.points[2 * exclude],
          self.descs[2 * exclude],
          float(self.needed[2 * exclude]),
      )
    else:
      g = _to_side(g0, SIDE)
      p, d, faint = _features(g)
      needed = _needed(g0.shape, faint)
      gs = _to_side(g, CHECK_SIDE)
    to_small = np.diag([gs.shape[1] / shape[1], gs.shape[0] / shape[0], 1.0])
    found = []
    if len(d) < MIN_INLIERS or self.codes.ntotal == 0:
      return found
    dist, ids = self.codes.search(d, 4)
    ok = (dist <= VOTE_DISTANCE) & (ids >= 0)
    votes = np.bincount(self.owner[ids[ok]], minlength=len(self.descs))
    if exclude >= 0:
      votes[2 * exclude : 2 * exclude + 2] = 0
    for view in np.argsort(-votes, kind="stable")[:CANDIDATE_VIEWS]:
      if votes[view] < MIN_VOTES:
        break
      pairs = bf.knnMatch(d, self.descs[view], k=2)
      good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < 0.85 * m[1].distance]
      if len(good) < MIN_INLIERS:
        continue
      src = p[[m.queryIdx for m in good]]
      dst = self.points[view][[m.trainIdx for m in good]]
      # a cheap affine gate (0.1 ms), then the homography (USAC, 0.5 ms; RANSAC's 300
      # iterations took 7 ms, most of the time of a U image)
      a, amask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=8.0)
      if a is None or int(amask.sum()) < MIN_INLIERS - 2:
        continue
      h, mask = cv2.findHomography(src, dst, cv2.USAC_FAST, 5.0)
      if h is None or int(mask.sum()) < MIN_INLIERS or not _plausible(h):
        continue
      f = CHECK_SIDE / SIDE  # h maps SIDE-sized images: now CHECK_SIDE-sized ones
      h = np.diag([f, f, 1.0]) @ h @ np.linalg.inv(to_small)
      s = aligned_similarity(gs, self.small[view], h)
      if s >= max(needed, self.needed[view]):
        found.append(Verdict(s, int(view) // 2, int(mask.sum())))
        if first:
          break
    return sorted(found, key=lambda v: -v.similarity)

  @_single_blas
  def match(self, images) -> Match:
    """Each of ``images`` against the evaluation images: the best similarity, the matched
    image, the decision (``copy``) and, where the local path decided, its inliers."""
    images = list(images)
    m = self.thumb.match(images, gate=COARSE_GATE)
    sim, idx = m.similarity.copy(), m.index.copy()
    inliers = np.zeros(len(images), np.int64)

    def holds(img, mm, j) -> bool:  # a thumbnail match, checked at 64 px (_detail_holds)
      return mm.similarity[j] >= self.threshold and self._detail_holds(
          img, mm.query[j], int(mm.index[j]), int(mm.view[j])
      )

    copy = np.array([holds(x, m, i) for i, x in enumerate(images)], bool)
    path = np.where(copy, "thumb", "").astype("<U7")
    trimmed = {}
    for i in np.flatnonzero(~copy):
      g = _grey_u8(images[i])
      t = trim_borders(g)
      if t is not g:
        trimmed[int(i)] = t
    at = {i: j for j, i in enumerate(trimmed)}
    if trimmed:
      mt = self.thumb.match(list(trimmed.values()), gate=COARSE_GATE)
      for j, i in enumerate(trimmed):
        if holds(trimmed[i], mt, j):
          sim[i], idx[i], copy[i] = mt.similarity[j], mt.index[j], True
          path[i] = "trimmed"
    # an overlay spoils the whole thumbnail's correlation, not the cells it does not cover
    for i in np.flatnonzero(~copy):
      tries = [(m, i)] + ([(mt, at[i])] if i in trimmed else [])
      for mm, j in tries:
        if (
            CELL_GATE <= mm.similarity[j] < self.threshold
            and (self.thumb.cell_similarity(mm.query[j], mm.index[j], mm.view[j]) >= CELL_THRESHOLD)
            and self._detail_at_least(
                images[i] if mm is m else trimmed[i],
                int(mm.index[j]),
                int(mm.view[j]),
                CELLS_DETAIL,
            )
        ):
          sim[i], idx[i], copy[i] = mm.similarity[j], mm.index[j], True
          path[i] = "cells"
          break
    for i in np.flatnonzero(~copy):
      found = self._local(images[i], first=True)
      if found:
        v = found[0]
        sim[i], idx[i], copy[i], inliers[i] = v.similarity, v.index, True, v.inliers
        path[i] = "local"
    return Match(sim, idx, copy, inliers, path=path)

  def _detail_holds(self, img, q: np.ndarray, e: int, at: int) -> bool:
    """Whether a thumbnail match of ``img`` (its fine rows ``q``) with evaluation image ``e``
    at views ``at`` stands at 64 px too (:meth:`_detail_at_least`): :data:`DETAIL_AGREEMENT`
    where the picture has texture at 32x32, :data:`SMOOTH_AGREEMENT` where it is smooth.
    Measured (benchmarks/webcopies.py seed 2, the photo-like scenes): look-alikes at
    0.07-0.12 (thumbnails) and 0.01-0.1 (cells), 1% of the copies under 0.15 and 0.49."""
    textured = self.thumb.cell_similarity(q, e, at) != -1
    return self._detail_at_least(img, e, at, DETAIL_AGREEMENT if textured else SMOOTH_AGREEMENT)

  def _detail_at_least(self, img, e: int, at: int, need: float) -> bool:
    """:meth:`ThumbIndex.detail_agreement` at least ``need``, or not measurable (too few
    textured cells: no evidence either way)."""
    d = self.thumb.detail_agreement(img, e, at)
    return d is None or d >= need

  def copies_within(self, i: int, img) -> set[int]:
    """The evaluation images other than ``i`` of which ``img`` (evaluation image ``i``) is
    a near-duplicate, by either path (thumbnail matches checked at 64 px, as in
    :meth:`match`)."""
    out = set()
    g = _grey_u8(img)
    t = trim_borders(g)
    for view in (g,) if t is g else (g, t):
      q = _query(grey(view))
      for e, at in self.thumb.copies_of(q, exclude=i, threshold=self.threshold).items():
        if self._detail_holds(view, q[1], e, at):
          out.add(e)
    out |= {v.index for v in self._local(img, exclude=i, own=True)}
    return out


def _binary_index(codes: np.ndarray, threads: int | None = None):
  """An index of ORB codes (256 bits): exact for up to :data:`EXACT_CODES` codes, else
  inverted lists (faiss IndexBinaryIVF) of about :data:`CODES_PER_LIST` codes each, whose
  centroids are codes drawn at random (no k-means: at ImageNet val's 30M codes, training
  65,536 centroids would take longer than everything else; a vote needs a near code in one
  of :data:`PROBES` lists, not balanced lists), found by an HNSW graph. Built on
  ``threads`` threads (default: a core each, :func:`_threads`)."""
  if len(codes) <= EXACT_CODES:
    index = faiss.IndexBinaryFlat(256)
    index.add(codes)
    return index
  nlist = int(min(MAX_LISTS, max(256, len(codes) // CODES_PER_LIST)))
  quantizer = faiss.IndexBinaryHNSW(256, 16)
  rng = np.random.default_rng(0)
  quantizer.add(codes[np.sort(rng.choice(len(codes), nlist, replace=False))])
  index = faiss.IndexBinaryIVF(quantizer, 256, nlist)
  assert index.is_trained  # (a quantizer holding nlist codes is the trained state)
  index.nprobe = PROBES
  quantizer.hnsw.efSearch = QUANTIZER_EF
  index._quantizer = quantizer  # (keep it alive: faiss does not own it)
  faiss.omp_set_num_threads(_threads(threads))
  try:
    index.add(codes)
  finally:
    faiss.omp_set_num_threads(1)
  return index


@_single_blas
def near_duplicate_pairs(images, threads: int | None = None) -> np.ndarray:
  """The pairs ``(i, j)``, ``i < j``, of ``images`` that are near-duplicates of one another
  by either path of :class:`Index` (int64 [m, 2], sorted, unique): each image against the
  index of all of them, itself left out, on ``threads`` threads (default: a core each,
  :func:`_threads`; the select stage runs classes side by side, and a class alone on all its
  threads: bssl/stages/dhat_dedup.py). Cost: an index of the images plus one match each."""
  images = list(images)
  if len(images) < 2:
    return np.zeros((0, 2), np.int64)
  threads = _threads(threads)
  index = Index(images, threads=threads)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    found = list(pool.map(index.copies_within, range(len(images)), images))
  out = [(min(i, j), max(i, j)) for i, js in enumerate(found) for j in js]
  return np.unique(np.asarray(out, np.int64).reshape(-1, 2), axis=0)
