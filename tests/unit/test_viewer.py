"""The viewer's install (integrity, rebasing under /viewer) and its routes, on a tiny fake build."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import vna.viewer
from services.dicomweb.viewer import viewer_router
from vna.viewer import (
    HOW_TO_ADD,
    MARKER,
    ViewerInstallError,
    app_config_js,
    install,
    installed,
    is_current,
    main,
)

INDEX = ('<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
         '<link rel="manifest" href="/manifest.json"><meta name="x" content="/assets/t.png">'
         '<script src="/app-config.js"></script><script defer src="/app.bundle.abc.js">'
         '</script><a href="//elsewhere.example/">x</a></head><body></body></html>')
FILES = {
    "index.html": INDEX,
    "app.bundle.abc.js": 'var x;\n__webpack_require__.p = "/";\nfetch("/dicomweb");\n',
    "worker.bundle.def.js": '__webpack_require__.p = "/";',
    "app.bundle.css": "@font-face{src:url(/f.woff2)} a{background:url(//cdn/x.png)}",
    "manifest.json": '{"icons": [{"src": "/assets/a.png"}], "start_url": "/"}',
    "app-config.js": "window.config = {};",
    "codec.wasm": "\0asm",
    "chunk.bundle.0123456789abcdef.js": "const a = 'repetitive';\n" * 200,
    "assets/a.png": "png",
}


def _tarball(path: Path, files: dict[str, str] = FILES) -> str:
    """Write an npm-style tarball (package/dist/...) and return its npm integrity."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {"package/package.json": "{}",
                           **{f"package/dist/{k}": v for k, v in files.items()}}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tarball = tmp_path / "app.tgz"
    monkeypatch.setattr(vna.viewer, "VIEWER_INTEGRITY", _tarball(tarball))
    return tarball


def test_install_rebases_the_build_under_viewer(tmp_path: Path, fake_package: Path) -> None:
    target = tmp_path / "viewer" / "dist"
    assert install(target, fake_package) is True
    html = (target / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in html
    assert 'src="/viewer/app.bundle.abc.js"' in html
    assert 'href="/viewer/manifest.json"' in html and 'content="/viewer/assets/t.png"' in html
    assert 'href="//elsewhere.example/"' in html  # protocol-relative: left alone
    js = (target / "app.bundle.abc.js").read_text()
    assert '__webpack_require__.p = "/viewer/";' in js and 'fetch("/dicomweb")' in js
    assert '"/viewer/"' in (target / "worker.bundle.def.js").read_text()
    css = (target / "app.bundle.css").read_text()
    assert "url(/viewer/f.woff2)" in css and "url(//cdn/x.png)" in css
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["icons"][0]["src"] == "/viewer/assets/a.png"
    assert manifest["start_url"] == "/viewer/"
    assert (target / "app-config.js").read_text() == app_config_js()
    assert is_current(target)
    assert installed(target) == json.loads((target / MARKER).read_text())
    # Installed already: nothing is fetched or unpacked again.
    assert install(target, fake_package) is False
    assert not list(target.parent.glob(".viewer-*"))


def test_a_tarball_that_is_not_the_pinned_one_is_refused(tmp_path: Path,
                                                         fake_package: Path) -> None:
    other = tmp_path / "other.tgz"
    _tarball(other, {**FILES, "index.html": INDEX + "<!-- changed -->"})
    target = tmp_path / "dist"
    with pytest.raises(ViewerInstallError, match="not @ohif/app"):
        install(target, other)
    assert not target.exists()


def test_an_unexpected_build_is_refused_and_leaves_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_package: Path) -> None:
    target = tmp_path / "dist"
    install(target, fake_package)
    odd = tmp_path / "odd.tgz"
    monkeypatch.setattr(vna.viewer, "VIEWER_INTEGRITY",
                        _tarball(odd, {"index.html": INDEX, "app.bundle.abc.js": "x"}))
    with pytest.raises(ViewerInstallError, match="public path"):
        install(target, odd, force=True)
    assert (target / "worker.bundle.def.js").exists()


def test_without_npm_the_optional_install_says_how_to_add_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    assert main(["install", "--dir", str(tmp_path / "dist"), "--optional"]) == 0
    assert "npm is missing" in capsys.readouterr().err
    assert main(["install", "--dir", str(tmp_path / "dist")]) == 1
    assert "make viewer" in capsys.readouterr().err


def test_app_config_points_at_this_servers_dicomweb() -> None:
    js = app_config_js()
    assert "window.location.origin + \"/dicomweb\"" in js
    assert '"routerBasename": "/viewer"' in js
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert f'"{root}": root' in js
    assert '"imageRendering": "wadors"' in js
    assert '"omitQuotationForMultipartRequest": true' in js


def _client(directory: Path) -> TestClient:
    app = FastAPI()
    app.include_router(viewer_router(directory))
    return TestClient(app)


def test_routes_serve_the_build_config_and_deep_links(tmp_path: Path,
                                                      fake_package: Path) -> None:
    target = tmp_path / "dist"
    client = _client(target)
    missing = client.get("/viewer/")
    assert missing.status_code == 404 and missing.text.strip() == HOW_TO_ADD

    install(target, fake_package)  # while the archive runs: no restart needed
    r = client.get("/viewer", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/viewer/"
    index = client.get("/viewer/")
    assert index.status_code == 200 and "PUBLIC_URL" in index.text
    assert index.headers["cache-control"] == "no-cache"
    deep = client.get("/viewer/viewer", params={"StudyInstanceUIDs": "1.2.3"})
    assert deep.status_code == 200 and deep.text == index.text
    assert client.get("/viewer/viewer/dicomjson").text == index.text
    config = client.get("/viewer/app-config.js")
    assert config.status_code == 200 and "window.config" in config.text
    assert config.headers["content-type"].startswith("text/javascript")
    wasm = client.get("/viewer/codec.wasm")
    assert wasm.headers["content-type"] == "application/wasm"
    assert client.get("/viewer/app.bundle.abc.js").headers["content-type"].startswith(
        "text/javascript")
    assert client.get("/viewer/assets/a.png").content == b"png"
    assert client.head("/viewer/assets/a.png").status_code == 200
    assert client.get("/viewer/no-such.bundle.js").status_code == 404
    assert client.get("/viewer/%2e%2e/app.tgz").status_code == 404


def test_scripts_go_gzipped_and_hashed_names_are_cached_for_good(tmp_path: Path,
                                                                  fake_package: Path) -> None:
    target = tmp_path / "dist"
    install(target, fake_package)
    assert (target / "chunk.bundle.0123456789abcdef.js.gz").is_file()
    assert not (target / "app.bundle.abc.js.gz").exists()  # too small to bother
    client = _client(target)
    url = "/viewer/chunk.bundle.0123456789abcdef.js"
    packed = client.get(url, headers={"Accept-Encoding": "gzip"})
    assert packed.headers["content-encoding"] == "gzip"
    assert packed.headers["content-type"].startswith("text/javascript")
    assert packed.text == FILES["chunk.bundle.0123456789abcdef.js"]
    assert "immutable" in packed.headers["cache-control"]
    plain = client.get(url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.text == packed.text
    again = client.get(url, headers={"Accept-Encoding": "gzip",
                                     "If-None-Match": packed.headers["etag"]})
    assert again.status_code == 304 and not again.content
    assert client.get("/viewer/app.bundle.abc.js").headers["cache-control"] == "no-cache"
