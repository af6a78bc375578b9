"""R(2+1)D models (both layouts of the intermediate width M), PyTorch parity and
conversion both ways, a train step that lowers the loss, clip sampling, and the
10-clip video-level prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bssl import ranking
from bssl.data import clips as clips_lib
from bssl.models import count_params
from bssl.models.video import create_video_model, mid_channels


def _by_hand(depths, layout, num_classes, widths=(64, 128, 256, 512), stem_mid=45, c=3):
  """Parameter count from the architecture's definition, independently of the model code:
  convolution weights, BatchNorm scale + bias, the classifier."""
  n = c * stem_mid * 49 + 2 * stem_mid + stem_mid * widths[0] * 3 + 2 * widths[0]
  cin = widths[0]
  for i, (w, d) in enumerate(zip(widths, depths)):
    for j in range(d):
      m1 = mid_channels(cin, w)
      m2 = m1 if layout == "torchvision" else mid_channels(w, w)
      n += cin * m1 * 9 + 2 * m1 + m1 * w * 3 + 2 * w  # conv1 (2+1)D + bn1
      n += w * m2 * 9 + 2 * m2 + m2 * w * 3 + 2 * w  # conv2 (2+1)D + bn2
      if (i > 0 and j == 0) or cin != w:
        n += cin * w + 2 * w  # 1x1x1 downsample + BN
      cin = w
  return n + cin * num_classes + num_classes


def _params(name, num_classes=400, **kw):
  m = create_video_model(name, num_classes, **kw)
  v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 4, 32, 32, 3)), train=False))
  return count_params(v["params"])


def test_parameter_counts_of_both_layouts():
  assert _params("r2plus1d_18") == 31_505_325  # torchvision's r2plus1d_18
  assert _params("r2plus1d_18") == _by_hand((2, 2, 2, 2), "torchvision", 400)
  assert _params("r2plus1d_34") == _by_hand((3, 4, 6, 3), "torchvision", 400) == 61_831_661
  assert _params("r2plus1d_vmz_18") == _by_hand((2, 2, 2, 2), "vmz", 400) == 33_370_839
  assert _params("r2plus1d_vmz_34") == _by_hand((3, 4, 6, 3), "vmz", 400) == 63_697_175
  assert mid_channels(64, 64) == 144 and mid_channels(64, 128) == 230  # the paper's M
  with pytest.raises(ValueError, match="unknown video model"):
    create_video_model("r3d_18", 10)
  with pytest.raises(ValueError, match="positive"):
    create_video_model("r2plus1d_small", 10, widths=(8, 0), depths=(1, 1))


@pytest.mark.parametrize(
    "name,kw",
    [
        ("r2plus1d_small", dict(widths=(8, 16), depths=(1, 2), stem_mid=6)),
        (
            "r2plus1d_small",
            dict(widths=(8, 16), depths=(2, 1), stem_mid=6, layout="vmz", stem_stride=2),
        ),
        ("r2plus1d_18", {}),
    ],
)
def test_pytorch_parity_and_conversion_both_directions(name, kw):
  torch = pytest.importorskip("torch")
  from bssl.backends import convert
  from bssl.backends.torch_models import create_torch_video_model

  c = 1 if name == "r2plus1d_small" else 3
  twin = create_torch_video_model(name, 5, in_channels=c, **kw)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # BatchNorm statistics that are not 0 / 1
    for mod in twin.modules():
      if isinstance(mod, torch.nn.BatchNorm3d):
        mod.running_mean.normal_(0, 0.1, generator=g)
        mod.running_var.uniform_(0.5, 1.5, generator=g)
        mod.weight.uniform_(0.5, 1.5, generator=g)
        mod.bias.normal_(0, 0.1, generator=g)
  twin.eval()
  x = np.random.default_rng(0).normal(size=(2, 4, 16, 16, c)).astype(np.float32)
  with torch.no_grad():
    want = twin(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).numpy()
  variables = convert.torch_state_dict_to_flax(twin.state_dict(), name, **kw)
  model = create_video_model(name, 5, **kw)
  got = np.asarray(model.apply(variables, x, train=False))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # and back: Flax variables (freshly initialised) -> torch, same logits
  fresh = model.init(jax.random.key(1), x, train=False)
  sd = convert.flax_to_torch_state_dict(fresh, name, **kw)
  back = create_torch_video_model(name, 5, in_channels=c, **kw)
  back.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  back.eval()
  with torch.no_grad():
    want2 = back(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).numpy()
  got2 = np.asarray(model.apply(fresh, x, train=False))
  np.testing.assert_allclose(got2, want2, rtol=1e-4, atol=1e-4 * np.abs(want2).max())


def test_a_train_step_lowers_the_loss_on_a_fixed_clip_batch():
  model = create_video_model("r2plus1d_small", 3, widths=(8, 16), depths=(1, 1), stem_mid=6)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 4, 12, 12, 1)).astype(np.float32)
  y = np.arange(6) % 3
  variables = model.init(jax.random.key(0), x, train=False)
  params, stats = variables["params"], variables["batch_stats"]
  opt = optax.sgd(0.5, momentum=0.9)
  state = opt.init(params)

  def loss_fn(p, s):
    logits, new = model.apply(
        {"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

  @jax.jit
  def step(p, s, o):
    (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), new["batch_stats"], o, loss

  losses = []
  for _ in range(15):
    params, stats, state, loss = step(params, stats, state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    "t,clip_len,stride,n",
    [(100, 8, 2, 10), (30, 16, 1, 10), (8, 8, 1, 3), (5, 8, 2, 4), (64, 8, 4, 1)],
)
def test_uniform_clips_cover_the_video_as_documented(t, clip_len, stride, n):
  starts = clips_lib.uniform_starts(t, clip_len, stride, n)
  span = (clip_len - 1) * stride + 1
  assert len(starts) == n and (np.diff(starts) >= 0).all()
  if t >= span and n > 1:
    assert starts[0] == 0 and starts[-1] + span == t  # first and last clip in range
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1  # uniform spacing (rounded)
  elif t < span:
    assert (starts == 0).all()  # short video: looped
  for s in starts:
    idx = clips_lib.clip_indices(s, t, clip_len, stride)
    assert idx.min() >= 0 and idx.max() < t and len(idx) == clip_len
  rng = np.random.default_rng(0)
  rs = [clips_lib.random_start(t, clip_len, stride, rng) for _ in range(200)]
  assert min(rs) >= 0 and max(rs) <= max(t - span, 0)


def test_ten_clip_prediction_is_the_mean_of_ten_single_clip_predictions():
  model = create_video_model("r2plus1d_small", 4, widths=(8,), depths=(1,), stem_mid=4)
  rng = np.random.default_rng(1)
  videos = rng.normal(size=(3, 40, 10, 10, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), videos[:1, :4], train=False)
  apply_fn = lambda c: model.apply(variables, c, train=False)
  batch = np.stack([clips_lib.clips_of(v, 4, 2, 10) for v in videos])  # [3, 10, 4, H, W, C]
  got = np.asarray(jax.jit(lambda c: ranking.video_level_probs(apply_fn, c))(batch))
  for b in range(3):
    single = [np.asarray(jax.nn.softmax(apply_fn(batch[b, i][None])))[0] for i in range(10)]
    np.testing.assert_allclose(got[b], np.mean(single, axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
