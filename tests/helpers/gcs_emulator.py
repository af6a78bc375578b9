"""In-memory GCS emulator on 127.0.0.1 so tests can use ``gs://bkt/...`` paths.

Clients are pointed at it through environment variables (``gcs.env``), which
must be set before the client libraries start: etils.epath/gcsfs and
tensorboardX/google-cloud-storage read ``STORAGE_EMULATOR_HOST``; orbax, through
tensorstore, reads ``TENSORSTORE_GCS_HTTP_URL`` + ``GOOGLE_AUTH_TOKEN_FOR_TESTING``.
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` stops new gcsfs from probing the bucket
type (a warning on every call).  Pass them to child processes:
``subprocess.run([...], env={**os.environ, **gcs.env})``.

Usage: ``from gcs_emulator import gcs`` in a test file or conftest, then take
``gcs`` as a fixture argument.  The pytest process itself is left on local disk
unless a test calls ``gcs.apply_env(monkeypatch)``.
"""

import logging

import pytest
from gcp_storage_emulator import server as _srv
from gcp_storage_emulator import settings as _settings
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects as _objects

BUCKET = "bkt"


def _move(request, response, storage, *args, **kwargs):
  """``moveTo``, used by gcsfs for rename, is missing in the emulator (a 501 that
  gcsfs retries for ~30 s before its copy+delete fallback): do copy+delete here."""
  p = request.params
  try:
    obj = _objects._copy(
        request.base_url,
        storage,
        p["bucket_name"],
        p["object_id"],
        p["bucket_name"],
        p["dest_object_id"],
    )
  except NotFound:
    response.status = _objects.HTTPStatus.NOT_FOUND
    return
  storage.delete_file(p["bucket_name"], p["object_id"])
  response.json(obj)


def _download(request, response, storage, *args, **kwargs):
  """Media downloads without ``x-goog-generation``: tensorstore (orbax's OCDBT manifest,
  read before every later checkpoint write) refuses them as "Malformed StorageGeneration".
  The real service sends the header; add it."""
  _original_download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def _generation_holds(request, storage, name):
  """GCS's ``ifGenerationMatch`` precondition, which the emulator ignores: the object's
  generation must be the given one (0: the object must not exist); else 412. The server
  handles one request at a time, so the check and the write are one step."""
  want = request.query.get("ifGenerationMatch")
  if not want or name is None:
    return True
  try:
    have = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
  except NotFound:
    have = "0"
  return have == str(want[0])


def _refuse_precondition(response):
  response.status = _objects.HTTPStatus.PRECONDITION_FAILED
  response.json({"error": {"code": 412, "message": "Precondition Failed"}})


def _insert(request, response, storage, *args, **kwargs):
  """Uploads with ``ifGenerationMatch`` (bssl's work directory lock on gs://)."""
  kind = (request.query.get("uploadType") or [""])[0]
  name = (request.query.get("name") or [None])[0]
  if name is None and kind == "multipart":
    name = (request.data.get("meta") or {}).get("name")
  if kind in ("media", "multipart") and not _generation_holds(request, storage, name):
    return _refuse_precondition(response)
  return _original_insert(request, response, storage, *args, **kwargs)


def _delete_object(request, response, storage, *args, **kwargs):
  """Deletes with ``ifGenerationMatch``."""
  if not _generation_holds(request, storage, request.params["object_id"]):
    return _refuse_precondition(response)
  return _original_delete(request, response, storage, *args, **kwargs)


if not getattr(_srv, "_bssl_move_patched", False):
  _original_download = _objects.download
  _original_insert, _original_delete = _objects.insert, _objects.delete
  # (the router falls back to the module's `insert` for uploads without /upload/)
  _objects.insert = _insert
  _srv.HANDLERS = tuple(
      (
          pattern,
          {
              m: {_original_insert: _insert, _original_delete: _delete_object}.get(h, h)
              for m, h in methods.items()
          },
      )
      for pattern, methods in _srv.HANDLERS
  )
  # `get` with ?alt=media (tensorstore's read URL) calls the module's `download` by name.
  _objects.download = _download
  _srv.HANDLERS = tuple(
      (pattern, {m: (_download if h is _original_download else h) for m, h in methods.items()})
      for pattern, methods in _srv.HANDLERS
  )
  _srv.HANDLERS = tuple(
      (
          rf"^{pre}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
          rf"(?P<dest_object_id>.*[^/]+)$",
          {_srv.POST: _move},
      )
      for pre in (_settings.API_ENDPOINT, "")
  ) + tuple(_srv.HANDLERS)
  _srv._bssl_move_patched = True


def start(port=None, quiet=True):
  """Starts the emulator (bucket ``bkt``; a free port when None) in a daemon thread
  of this process.  Returns ``(server, env)``; stop with ``server.stop()``."""
  if quiet:  # it logs every 404 ("Resource not found") and every request
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  server = _srv.create_server("127.0.0.1", port or 0, in_memory=True, default_bucket=BUCKET)
  server._api.daemon = True  # never keeps the interpreter alive
  server.start()
  if quiet:  # clients that hang up early print BrokenPipe tracebacks otherwise
    server._api._httpd.handle_error = lambda request, client_address: None
  url = "http://127.0.0.1:%d" % server._api._httpd.server_address[1]
  env = {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
      "GOOGLE_CLOUD_PROJECT": "test",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  return server, env


class GCS:
  """What the ``gcs`` fixture yields."""

  def __init__(self, server, env):
    self.server, self.env = server, env

  def url(self, path=""):
    return "gs://%s/%s" % (BUCKET, path.lstrip("/"))

  def apply_env(self, monkeypatch):
    """Sets ``env`` in this process (only for clients created afterwards)."""
    for k, v in self.env.items():
      monkeypatch.setenv(k, v)


@pytest.fixture(scope="session")
def gcs():
  server, env = start()
  yield GCS(server, env)
  server.stop()
