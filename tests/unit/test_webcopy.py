"""bssl/data/webcopy.py: every web-copy family gives a valid RGB image, the same one for a
seed, different from the original, and of the geometry it claims."""

import numpy as np
import pytest
from PIL import Image

from bssl.data import planted, webcopy

H, W = 120, 150


@pytest.fixture(scope="module")
def img():
  a = np.asarray(Image.fromarray(planted.scene(3, size=160)).resize((W, H), Image.BILINEAR))
  return np.ascontiguousarray(a)


def _sub(big: np.ndarray, small: np.ndarray) -> bool:
  """Whether ``small`` lies in ``big`` pixel for pixel."""
  bh, bw = big.shape[:2]
  sh, sw = small.shape[:2]
  for y in range(bh - sh + 1):
    for x in range(bw - sw + 1):
      if np.array_equal(big[y : y + sh, x : x + sw], small):
        return True
  return False


def _sharpness(a: np.ndarray) -> float:
  g = np.asarray(Image.fromarray(a).convert("L"), np.float32)
  lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
  return float(lap.var())


def _changed_box(a: np.ndarray, b: np.ndarray) -> float:
  """The area of the box around the pixels that differ (by > 40 levels), over the image."""
  ys, xs = np.nonzero(np.abs(a.astype(int) - b.astype(int)).max(2) > 40)
  if len(ys) == 0:
    return 0.0
  return (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) / (a.shape[0] * a.shape[1])


@pytest.mark.parametrize("family", webcopy.FAMILIES)
def test_valid_deterministic_changed(img, family):
  for seed in range(4):
    a = webcopy.web_copy(img, family, np.random.default_rng(seed))
    b = webcopy.web_copy(img, family, np.random.default_rng(seed))
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= 8
    assert np.array_equal(a, b)
    if a.shape == img.shape:
      assert np.abs(a.astype(int) - img).mean() > 1.0, family
  grey = webcopy.web_copy(img[..., 0], family, np.random.default_rng(0))  # HxW input
  assert grey.ndim == 3 and grey.shape[2] == 3


def test_geometry(img):
  for seed in range(6):
    rng = lambda: np.random.default_rng(seed)  # noqa: E731
    c = webcopy.web_copy(img, "caption", rng())
    band = c.shape[0] - H
    assert c.shape[1] == W and 0.15 * H - 1 <= band <= 0.25 * H + 1
    assert np.array_equal(c[band:], img)  # the image kept whole below the band
    top = c[:band].reshape(-1, 3)
    assert np.mean(np.all(top == top[0], axis=1)) > 0.6 and top[0].tolist() in (
        [0] * 3,
        [255] * 3,
    )
    assert (top != top[0]).any()  # words in the band

    t = webcopy.web_copy(img, "text", rng())
    assert t.shape == img.shape and 0.04 < _changed_box(img, t) < 0.45

    s = webcopy.web_copy(img, "sticker", rng())
    assert s.shape == img.shape and 0.06 < _changed_box(img, s) < 0.3

    lb = webcopy.web_copy(img, "letterbox", rng())
    r = lb.shape[1] / lb.shape[0]
    assert min(abs(r / f - 1) for f in (16 / 9, 1.85, 2.35, 4 / 3, 9 / 16)) < 0.02
    assert (lb.shape[0] == H) != (lb.shape[1] == W) and _sub(lb, img)

    p = webcopy.web_copy(img, "pad_square", rng())
    assert p.shape[0] == p.shape[1] >= W

    cr = webcopy.web_copy(img, "crop", rng())
    assert 0.59 <= cr.shape[0] * cr.shape[1] / (H * W) <= 0.63
    assert 0.75 <= (cr.shape[1] / cr.shape[0]) / (W / H) <= 1.3
    assert _sub(img, cr)

    st = webcopy.web_copy(img, "aspect", rng())
    f = max(st.shape[0] / H, st.shape[1] / W)
    assert 1.29 <= f <= 1.51 and (st.shape[0] == H or st.shape[1] == W)

    ro = webcopy.web_copy(img, "rotate", rng())
    grown = ro.shape[0] > H and ro.shape[1] > W  # filled corners
    inner = ro.shape[0] < H and ro.shape[1] < W  # cropped to the inner rectangle
    assert grown or inner

    pe = webcopy.web_copy(img, "perspective", rng())
    assert pe.shape != img.shape or np.abs(pe.astype(int) - img).mean() > 10

    d = webcopy.web_copy(img, "downscale", rng())
    assert 0.26 <= d.shape[1] / W <= 0.34 and 0.26 <= d.shape[0] / H <= 0.34

    g = webcopy.web_copy(img, "grey_mirror", rng())
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 0] == g[..., 2]).all()
    ref = np.asarray(Image.fromarray(img).convert("L"))[:, ::-1]
    assert np.array_equal(g[..., 0], ref)

    assert _sharpness(webcopy.web_copy(img, "blur", rng())) < 0.5 * _sharpness(img)
    assert _sharpness(webcopy.web_copy(img, "sharpen", rng())) > 1.5 * _sharpness(img)

    j = webcopy.web_copy(img, "jpeg", rng())
    assert j.shape == img.shape and np.abs(j.astype(int) - img).mean() > 1.0

    co = webcopy.web_copy(img, "color", rng())
    assert co.shape == img.shape and np.abs(co.astype(int) - img).mean() > 10


def test_rotate_inner_crop_holds_no_fill():
  flat = np.full((H, W, 3), 200, np.uint8)
  inner = 0
  for seed in range(12):
    r = webcopy.web_copy(flat, "rotate", np.random.default_rng(seed))
    if r.shape[0] < H:  # cropped to the inner rectangle: no corner left
      inner += 1
      assert (r == 200).all(), seed
    else:  # filled corners: the fill is there
      assert (r != 200).any(), seed
  assert 0 < inner < 12


def test_combo_and_unknown(img):
  seen = set()
  for seed in range(10):
    a, name = webcopy.combo(img, np.random.default_rng(seed))
    b, name2 = webcopy.combo(img, np.random.default_rng(seed))
    first, second = name.split("+")
    assert first != second and {first, second} <= set(webcopy.FAMILIES)
    assert name == name2 and np.array_equal(a, b) and a.dtype == np.uint8 and a.shape[2] == 3
    seen.add(name)
  assert len(seen) > 5
  with pytest.raises(ValueError, match="unknown web-copy family"):
    webcopy.web_copy(img, "nope", np.random.default_rng(0))
