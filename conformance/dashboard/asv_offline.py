"""Make ``asv publish``'s pages render offline: local copies of the scripts they load from CDNs.

asv's ``index.html`` loads jQuery, flot (and its time, selection, categories and orderBars
plugins), stupidtable, blueimp-md5 and bootstrap from code.jquery.com, cdnjs and jsDelivr; on a
machine without internet (this project's, many GPU clusters) the speed dashboard then shows only
"One or more external (JavaScript) dependencies of airspeed velocity failed to load".

``asv_vendor/`` ships pinned copies (``asv_vendor/VENDOR.json``: each file's CDN address, npm
package, version, licence and sha256; the licence texts in ``asv_vendor/licenses/``). After
``asv publish``, :func:`localize` copies them into ``<html>/vendor/`` (checking each file's
sha256) and rewrites every page's ``<script src>`` and ``<link href>`` that names one of those
addresses to the local copy, dropping the ``integrity``/``crossorigin`` attributes that belong to
the CDN file. An external script or stylesheet it does not know is reported, never left silently.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

VENDOR = Path(__file__).resolve().parent / "asv_vendor"
#: A script or stylesheet tag with an external address.
EXTERNAL = re.compile(r'<(script|link)\b([^>]*?)\b(src|href)="(https?://[^"]+)"([^>]*)>', re.IGNORECASE)
CDN_ONLY = re.compile(r'\s(integrity|crossorigin|referrerpolicy)="[^"]*"', re.IGNORECASE)


def manifest() -> dict[str, Any]:
    return json.loads((VENDOR / "VENDOR.json").read_text())


def copy_vendor(html_dir: Path) -> Path:
    """``asv_vendor`` into ``<html>/vendor``, each file checked against its recorded sha256."""
    target = html_dir / "vendor"
    data = manifest()
    for entry in data["scripts_and_styles"] + data["assets"]:
        source = VENDOR / entry["file"]
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise RuntimeError(
                f"{source}: sha256 {digest} is not the recorded {entry['sha256']} (asv_vendor/VENDOR.json); "
                "restore the file from git"
            )
        (target / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target / entry["file"])
    shutil.copytree(VENDOR / "licenses", target / "licenses", dirs_exist_ok=True)
    return target


def rewrite(page: str, local: dict[str, str]) -> tuple[str, list[str]]:
    """``page`` with each known CDN address replaced by ``vendor/<file>``; returns the page and
    the external addresses it does not know."""
    unknown: list[str] = []

    def swap(match: re.Match) -> str:
        tag, before, attr, url, after = match.groups()
        if url not in local:
            if tag.lower() == "script" or "stylesheet" in (before + after).lower():
                unknown.append(url)
            return match.group(0)
        return f'<{tag}{CDN_ONLY.sub("", before)}{attr}="vendor/{local[url]}"{CDN_ONLY.sub("", after)}>'

    return EXTERNAL.sub(swap, page), unknown


def localize(html_dir: Path) -> list[str]:
    """Copy the vendored files into ``html_dir`` and point asv's pages at them; returns the
    external scripts or stylesheets left (none with the asv this project pins)."""
    if not (html_dir / "index.html").is_file():
        return []
    copy_vendor(html_dir)
    local = {entry["url"]: entry["file"] for entry in manifest()["scripts_and_styles"]}
    left: list[str] = []
    for path in sorted(html_dir.glob("*.html")):
        page, unknown = rewrite(path.read_text(), local)
        path.write_text(page)
        left += [f"{path.name}: {url}" for url in unknown]
    return left
