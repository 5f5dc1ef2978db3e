"""A GCS server on 127.0.0.1 for tests: gcp-storage-emulator, in memory, with one bucket.

`python tests/gcs_emulator.py PORT BUCKET` serves until killed.

One fix to the emulator: real GCS sends an object's generation in the `x-goog-generation` header
of a media read, and TensorStore (under Orbax) needs it to update a file it read (an OCDBT
manifest); the emulator leaves it out, so it is added here.
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    stored = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(stored['generation'])


def main(port: str, bucket: str):
  objects.download = _download_with_generation  # `objects.get` calls it for ?alt=media reads
  server.create_server('127.0.0.1', int(port), in_memory=True, default_bucket=bucket).run()


if __name__ == '__main__':
  main(*sys.argv[1:])
