"""The service fixture: a tiny trained bundle in a fresh workspace, served through FastAPI's TestClient."""

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from handlens.serve.app import create_app
from handlens.serve.settings import ServeSettings
from tests.conftest import colour_tree, split_workspace, tiny_config


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, run id, root): the colours dataset imported and split, one tiny model trained, the service up."""
    from handlens.train.run import train

    root = tmp_path_factory.mktemp("serve")
    ws = split_workspace(root, colour_tree(root / "colours"))
    result = train(tiny_config(), ws)
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, max_upload_bytes=200_000, max_pixels=1_000_000,
                             max_backward_passes=16, allowed_hosts=["testserver"])  # the test client's Host
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        yield client, result.run_id, root


def png_bytes(colour=(200, 40, 40), size=(40, 40), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()
