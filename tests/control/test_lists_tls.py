"""
The large lists of a real ``pyflock-control`` over real TLS (issue 12): curl asking for
gzip gets a gzip body that decodes to the same datasets as the plain answer.
"""

import gzip
import json
import subprocess
from uuid import uuid4

import pytest
import pytest_twisted

from pyflock.common._model import Dataset
from pyflock.control._lists import CHUNK
from pyflock.control._sqlite_store import open_sqlite_store
from pyflock.control._store import StoreWrite
from tests.control import test_integration as integration

reactor, cluster, controls = integration.reactor, integration.cluster, integration.controls

pytestmark = pytest.mark.integration

#: Enough datasets for a plain list of several chunks.
COUNT = 3 * CHUNK // 100


def curl_raw(cluster, url, accept_encoding, folder):
    """GET ``url`` with curl as alice, decoding nothing; (headers, body bytes)."""
    headers, body = folder / f"headers-{accept_encoding}", folder / f"body-{accept_encoding}"
    subprocess.run(["curl", "--silent", "--show-error", "--fail", "--max-time", "30",
                    "--cacert", str(cluster.path / "cluster.crt"),
                    "--cert", str(cluster.path / "alice.crt"),
                    "--key", str(cluster.path / "alice.key"),
                    "-H", f"Accept-Encoding: {accept_encoding}",
                    "--dump-header", str(headers), "--output", str(body), url],
                   check=True, timeout=40)
    lines = headers.read_text().lower().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            if k}, body.read_bytes()


@pytest_twisted.ensureDeferred
async def test_gzip_list_over_tls(reactor, tmp_path, controls, cluster):
    """A gzip list over TLS decodes to the same datasets as the plain one."""
    datasets = tuple((d.dataset_id, d) for d in (
        Dataset(dataset_id=str(uuid4()), primary=cluster.node_uuids[0],
                metadata={"name": f"n{i}"}) for i in range(COUNT)))
    store = await open_sqlite_store(reactor, tmp_path / "data")
    try:
        await store.write(StoreWrite(datasets=datasets, generation=1))
    finally:
        await store.close()
    control = controls()
    control.start()
    url = control.url + "/v1/configuration/datasets"
    plain_headers, plain = curl_raw(cluster, url, "identity", tmp_path)
    zipped_headers, zipped = curl_raw(cluster, url, "gzip, deflate", tmp_path)
    assert (plain_headers.get("content-encoding"), zipped_headers["content-encoding"]) \
        == (None, "gzip")
    assert len(plain) > 2 * CHUNK and int(plain_headers["content-length"]) == len(plain)
    assert int(zipped_headers["content-length"]) == len(zipped) < len(plain) / 3
    listed = json.loads(gzip.decompress(zipped))
    assert listed == json.loads(plain)
    assert sorted(d["dataset_id"] for d in listed) == sorted(i for i, _ in datasets)
