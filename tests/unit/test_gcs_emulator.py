"""The local GCS emulator (tests/helpers/gcs_emulator.py) works for child processes."""

import os
import subprocess
import sys
import textwrap


def _run(gcs, code, timeout=60):
  r = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      env={**os.environ, **gcs.env},
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  return r.stdout


def test_epath_round_trip_across_processes(gcs):
  root = gcs.url("epath")
  _run(
      gcs,
      f"""
      import io, numpy as np
      from etils import epath
      root = epath.Path({root!r})
      assert str(root) == {root!r}
      (root / "sub").mkdir(parents=True, exist_ok=True)
      (root / "sub" / "a.txt").write_text("hello")
      buf = io.BytesIO(); np.savez(buf, x=np.arange(4)); (root / "x.npz").write_bytes(buf.getvalue())
      with (root / "s.bin").open("wb") as f:
        f.write(b"ab"); f.write(b"cd")
      (root / "s.bin").rename(root / "t.bin")
  """,
  )
  out = _run(
      gcs,
      f"""
      import io, numpy as np
      from etils import epath
      root = epath.Path({root!r})
      assert (root / "sub").is_dir() and not (root / "s.bin").exists()
      assert (root / "t.bin").read_bytes() == b"abcd"
      assert np.load(io.BytesIO((root / "x.npz").read_bytes()))["x"].tolist() == [0, 1, 2, 3]
      print(sorted(p.name for p in root.iterdir()), (root / "sub" / "a.txt").read_text())
      root.rmtree()
      assert not root.exists()
  """,
  )
  assert out.split() == ["['sub',", "'t.bin',", "'x.npz']", "hello"]


def test_orbax_standard_checkpointer_round_trip(gcs):
  out = _run(
      gcs,
      f"""
      import jax, jax.numpy as jnp, orbax.checkpoint as ocp
      tree = {{"w": jnp.arange(6.0).reshape(2, 3), "n": {{"b": jnp.ones(2, jnp.int32)}}}}
      ck = ocp.StandardCheckpointer()
      ck.save({gcs.url('orbax/v')!r}, tree, force=True)
      ck.wait_until_finished()
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
      back = ck.restore({gcs.url('orbax/v')!r}, abstract)
      assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), tree, back)))
      print("ok", float(back["w"].sum()))
  """,
  )
  assert out.split()[-2:] == ["ok", "15.0"]
