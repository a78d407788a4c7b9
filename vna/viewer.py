"""The OHIF viewer served at ``/viewer``: install its prebuilt build, write its configuration.

The npm package ``@ohif/app`` ships OHIF's production build in ``dist/``, made
for the site root: webpack's public path, ``window.PUBLIC_URL`` and the links of
``index.html``, the stylesheets and ``manifest.json`` all say ``/``. Installing
fetches the pinned tarball with ``npm pack`` (or takes one copied in by hand),
checks it against the pinned integrity, unpacks ``dist/`` and moves those
root-relative URLs under ``/viewer/``, and gzips its main scripts beside them.
Nothing is built, so no Node toolchain
beyond ``npm pack`` is needed, and not even that with ``--tarball``.

``app_config_js`` is the ``app-config.js`` the archive serves in place of the
package's own: one DICOMweb data source, this server's ``/dicomweb``.

Run ``python -m vna.viewer install`` (``make viewer``); ``--optional`` turns a
missing npm or an unreachable registry into a message instead of a failure
(``make run`` uses it: the archive starts without the viewer).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VIEWER_PACKAGE = "@ohif/app"
VIEWER_VERSION = "3.13.2"
VIEWER_INTEGRITY = ("sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F"
                    "87BKxFfpq+jd5xXZB9E8EA==")
"""npm's integrity string of the pinned tarball (``npm view @ohif/app@<v> dist.integrity``)."""
VIEWER_TARBALL_URL = "https://registry.npmjs.org/@ohif/app/-/app-3.13.2.tgz"
VIEWER_PATH = "/viewer"
"""Where the archive serves the viewer; the installed build's URLs are rebased here."""
DICOMWEB_PATH = "/dicomweb"
MARKER = ".vna-viewer.json"
"""Written last into an installed viewer directory: what is installed and for which path."""
INSTALL_LAYOUT = "3"
"""What an install does to the build (3: rebased, configured, gzipped); another one reinstalls."""

HOW_TO_ADD = (
    f"The viewer ({VIEWER_PACKAGE}@{VIEWER_VERSION}) is not installed, so {VIEWER_PATH} "
    "is not served. To add it: install npm (apt-get install npm) and run `make viewer`; "
    f"or, on a machine without npm, fetch {VIEWER_TARBALL_URL} (any way you can) and run "
    "`.venv/bin/python -m vna.viewer install --tarball app-3.13.2.tgz`.")


class ViewerInstallError(RuntimeError):
    """The viewer could not be installed; the message says why and what to do."""


def installed(directory: Path) -> dict[str, str] | None:
    """The marker of a complete install in ``directory`` (None: none there)."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not (directory / "index.html").is_file():
        return None
    return {str(k): str(v) for k, v in marker.items()}


def is_current(directory: Path) -> bool:
    """True when ``directory`` holds the pinned version rebased to ``VIEWER_PATH``."""
    marker = installed(directory)
    return marker is not None and marker.get("integrity") == VIEWER_INTEGRITY and \
        marker.get("base") == VIEWER_PATH + "/" and marker.get("layout") == INSTALL_LAYOUT


def verify_integrity(tarball: Path, integrity: str | None = None) -> None:
    """Raise unless ``tarball`` has the npm ``integrity`` (``sha512-<base64>``; the pin)."""
    algorithm, _, expected = (integrity or VIEWER_INTEGRITY).partition("-")
    digest = hashlib.new(algorithm)
    with tarball.open("rb") as fp:
        while chunk := fp.read(1 << 20):
            digest.update(chunk)
    got = base64.b64encode(digest.digest()).decode()
    if got != expected:
        raise ViewerInstallError(
            f"{tarball} is not {VIEWER_PACKAGE}@{VIEWER_VERSION}: its {algorithm} is {got}, "
            f"the pinned one is {expected}")


def npm_pack(workdir: Path) -> Path:
    """Fetch the pinned tarball into ``workdir`` with ``npm pack``; return its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerInstallError("npm is missing. " + HOW_TO_ADD)
    spec = f"{VIEWER_PACKAGE}@{VIEWER_VERSION}"
    try:
        done = subprocess.run([npm, "pack", "--silent", spec], cwd=workdir,
                              capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ViewerInstallError(f"npm pack {spec} took too long. " + HOW_TO_ADD) from exc
    if done.returncode != 0:
        raise ViewerInstallError(f"npm pack {spec} failed: {done.stderr.strip()[-800:]}\n"
                                 + HOW_TO_ADD)
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise ViewerInstallError(f"npm pack {spec} left {len(tarballs)} tarballs in {workdir}")
    return tarballs[0]


# Root-relative URLs in the build, and what they become under the base path.
_WEBPACK_PUBLIC_PATH = re.compile(r'__webpack_require__\.p = "/";')
_HTML_ATTRIBUTE = re.compile(r'((?:href|src|content)=")/(?!/)')
_PUBLIC_URL = re.compile(r'window\.PUBLIC_URL="/"')
_CSS_URL = re.compile(r"url\(/(?!/)")
_MANIFEST_URL = re.compile(r'("(?:src|start_url)":\s*")/(?!/)')


def rebase(dist: Path, base: str = VIEWER_PATH + "/") -> None:
    """Move the build's root-relative URLs in ``dist`` under ``base`` (``/viewer/``).

    Raises when the build does not look as expected (no public path found in the
    main bundle, or no ``PUBLIC_URL`` in ``index.html``): better no viewer than
    one that loads half its files from the wrong place.
    """
    index = dist / "index.html"
    html = index.read_text()
    html, n = _PUBLIC_URL.subn(f'window.PUBLIC_URL="{base}"', html)
    if n == 0:
        raise ViewerInstallError("index.html sets no window.PUBLIC_URL: unexpected build")
    html = _HTML_ATTRIBUTE.sub(lambda m: m.group(1) + base, html)
    index.write_text(html)

    rebased_main = False
    for script in dist.glob("*.js"):
        text = script.read_text(encoding="utf-8")
        new, n = _WEBPACK_PUBLIC_PATH.subn(f'__webpack_require__.p = "{base}";', text)
        if n:
            script.write_text(new, encoding="utf-8")
            rebased_main = rebased_main or script.name.startswith("app.bundle.")
    if not rebased_main:
        raise ViewerInstallError("app.bundle.*.js sets no webpack public path: unexpected build")
    for sheet in dist.glob("*.css"):
        text = sheet.read_text(encoding="utf-8")
        new = _CSS_URL.sub(f"url({base}", text)
        if new != text:
            sheet.write_text(new, encoding="utf-8")
    manifest = dist / "manifest.json"
    if manifest.is_file():
        manifest.write_text(_MANIFEST_URL.sub(lambda m: m.group(1) + base, manifest.read_text()))


_COMPRESSIBLE = {".js", ".css", ".wasm", ".json", ".svg"}


def precompress(dist: Path, min_size: int = 1024) -> int:
    """Write ``<file>.gz`` beside the build's top-level scripts, styles and wasm.

    The archive sends them to browsers that accept gzip (about a quarter of the
    bytes over a hospital network). Subfolders (onnxruntime, the microscopy
    viewer: loaded only by tools that need them) are left as they are.
    Returns the number of files compressed.
    """
    count = 0
    for path in sorted(dist.iterdir()):
        if path.suffix not in _COMPRESSIBLE or not path.is_file():
            continue
        data = path.read_bytes()
        if len(data) < min_size:
            continue
        packed = gzip.compress(data, compresslevel=6, mtime=0)
        if len(packed) < len(data) * 9 // 10:
            path.with_name(path.name + ".gz").write_bytes(packed)
            count += 1
    return count


def install(directory: Path, tarball: Path | None = None, *, force: bool = False) -> bool:
    """Install the pinned viewer into ``directory``; False when it already was there.

    ``tarball``: a copy of the package's tarball to use instead of ``npm pack``.
    The new build is unpacked beside ``directory`` and swapped in whole, so a
    failed or interrupted install leaves what was there before.
    """
    if not force and is_current(directory):
        return False
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".viewer-", dir=directory.parent) as tmp:
        work = Path(tmp)
        source = tarball if tarball is not None else npm_pack(work)
        verify_integrity(source)
        unpacked = work / "unpacked"
        with tarfile.open(source, "r:gz") as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            if not members:
                raise ViewerInstallError(f"{source} has no package/dist/: not a built OHIF")
            archive.extractall(unpacked, members=members, filter="data")
        dist = unpacked / "package" / "dist"
        rebase(dist)
        # The package's own points at OHIF's public demo server; the archive serves
        # this one at the same URL, and a copy served by another web server gets it too.
        (dist / "app-config.js").write_text(app_config_js())
        precompress(dist)
        (dist / MARKER).write_text(json.dumps({  # last: its presence means complete
            "package": VIEWER_PACKAGE, "version": VIEWER_VERSION,
            "integrity": VIEWER_INTEGRITY, "base": VIEWER_PATH + "/",
            "layout": INSTALL_LAYOUT}, indent=1) + "\n")
        old = work / "old"
        if directory.exists():
            directory.rename(old)
        dist.rename(directory)
    return True


def app_config_js(*, dicomweb_path: str = DICOMWEB_PATH, base: str = VIEWER_PATH) -> str:
    """OHIF's ``window.config`` for this archive: its DICOMweb as the one data source.

    The roots are made absolute in the browser from ``window.location.origin``,
    so the same file works whatever host name and port the viewer was reached by.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "VNA",
            "name": "vna",
            "qidoRoot": "@ROOT@",
            "wadoRoot": "@ROOT@",
            "wadoUriRoot": "@ROOT@",
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "supportsStow": True,
            "dicomUploadEnabled": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "name": "vna",
        "routerBasename": base,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 10, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
        "investigationalUseDialog": {"option": "never"},
    }
    body = json.dumps(config, indent=2).replace('"@ROOT@"', "root")
    return (
        "/* Written by the VNA archive (vna/viewer.py): OHIF on this server's DICOMweb. */\n"
        f"const root = window.location.origin + {json.dumps(dicomweb_path)};\n"
        f"window.config = {body};\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vna.viewer",
                                     description="Install the OHIF viewer served at /viewer.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("install", help="install the pinned @ohif/app build")
    add.add_argument("--dir", type=Path, default=Path("viewer/dist"),
                     help="where to install it (VNA_VIEWER_DIR; default viewer/dist)")
    add.add_argument("--tarball", type=Path, help="use this copy of the package's tarball")
    add.add_argument("--force", action="store_true", help="install again even if current")
    add.add_argument("--optional", action="store_true",
                     help="when it cannot be installed, say how to add it and exit 0")
    args = parser.parse_args(argv)
    spec = f"{VIEWER_PACKAGE}@{VIEWER_VERSION}"
    try:
        if install(args.dir, args.tarball, force=args.force):
            print(f"viewer: installed {spec} into {args.dir} (served at {VIEWER_PATH})")
        else:
            print(f"viewer: {spec} is installed in {args.dir}")
    except (ViewerInstallError, OSError, tarfile.TarError) as exc:
        print(f"viewer: not installed: {exc}", file=sys.stderr)
        return 0 if args.optional else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
