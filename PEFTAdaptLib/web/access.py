"""Who may reach the browser app and which files it touches.

Loopback by default. Bound to any other address the app requires a token: the URL printed at start carries it once
(`?token=…`), the server answers with a cookie, and every later request — page, assets, the websocket — must carry
one or the other. Websocket upgrades from another site's page are refused (a page on the web could otherwise reach
a loopback server through the user's browser), and on loopback only loopback host names are served (DNS rebinding).

Uploads land in the work folder under names the server makes; files are picked from the data folder by a path
relative to it, and nothing outside either folder is read or written.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from ..data.formats import image_suffix
from ..data.labelmap import is_label_map_file
from ..errors import InputError

TOKEN_ENV = "PEFTADAPT_WEB_TOKEN"
TOKEN_COOKIE = "peftadapt_token"
#: a larger upload is refused before its bytes are sent (the page checks the size) and again on arrival
MAX_UPLOAD_BYTES = 1 << 30
#: a label map (labels in another numbering, data/labelmap.py)
LABEL_MAP_SUFFIX = ".json"
#: header and data in one file (a detached header, .nhdr or .mhd, would need a second upload beside it), or a label map
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mgz", ".mgh", LABEL_MAP_SUFFIX)
#: the data-folder picker lists at most this many files (a folder of a whole archive stays usable)
MAX_LISTED_FILES = 5000


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def access_token(host: str, token: str | None = None) -> str | None:
    """The token the server requires: the one given (or `$PEFTADAPT_WEB_TOKEN`); on a non-loopback address a new
    random one when none is given; None (no token) on loopback."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        token = "t" + secrets.token_urlsafe(24)  # a letter first: the page's URL parser keeps it a string
    return token


def _host_name(header: str) -> str:
    """The host of a `Host`/`Origin` value, without scheme and port (IPv6 brackets kept off)."""
    value = header.split("://", 1)[-1].split("/", 1)[0]
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def check_request(headers, query: dict, cookies: dict, token: str | None, loopback: bool) -> str | None:
    """Why this HTTP request is refused, or None. `headers` needs `.get` (case-insensitive)."""
    host = headers.get("Host", "")
    if loopback and not is_loopback(_host_name(host)):
        return f"host '{host}' is not a loopback name"
    origin = headers.get("Origin")
    if headers.get("Upgrade", "").lower() == "websocket" and origin and origin.split("://", 1)[-1] != host:
        return f"websocket from another site ({origin})"
    if token is None:
        return None
    given = query.get("token") or cookies.get(TOKEN_COOKIE) or ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        return "a token is required: open the URL printed when the server started (it ends with ?token=…)"
    return None


def token_middleware(token: str | None, loopback: bool):
    """aiohttp middleware applying `check_request`; a valid `?token=` is exchanged for a cookie."""
    from aiohttp import web

    @web.middleware
    async def guard(request, handler):
        refusal = check_request(request.headers, request.query, request.cookies, token, loopback)
        if refusal is not None:
            return web.Response(status=403, text=f"PEFTAdapt: {refusal}\n")
        response = await handler(request)
        if token is not None and request.query.get("token") and not response.prepared:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    return guard


def inside(root: Path, relative: str, what: str = "file") -> Path:
    """`relative` resolved under `root` (symlinks followed); refused when it leads outside."""
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"{relative}: {what} outside {root}")
    return path


def is_label_map(name: str) -> bool:
    return name.lower().endswith(LABEL_MAP_SUFFIX)


def _is_image(name: str) -> bool:
    try:
        image_suffix(name)
    except InputError:
        return False
    return True


def upload_name(name: str) -> str:
    """The file name an upload is saved under: no folders, an image type read in one file, or a label map."""
    base = Path(name.replace("\\", "/")).name
    if is_label_map(base):
        return base
    try:
        suffix = image_suffix(base or name)
    except InputError:  # its list names every type read, some of which an upload refuses
        raise InputError(f"{base or name}: unsupported file type; upload one of {', '.join(UPLOAD_SUFFIXES)}") from None
    if suffix not in UPLOAD_SUFFIXES:
        raise InputError(f"{base}: {suffix} keeps its voxels in a second file; upload a single-file format "
                         f"({', '.join(UPLOAD_SUFFIXES)})")
    return base


def save_upload(folder: Path, name: str, content: bytes) -> Path:
    """Write one uploaded file into a fresh subfolder of `folder` (inside the work folder)."""
    base = upload_name(name)
    if len(content) > MAX_UPLOAD_BYTES:
        raise InputError(f"{base}: {len(content) / 2**20:.0f} MiB is over the upload limit of "
                         f"{MAX_UPLOAD_BYTES / 2**20:.0f} MiB")
    path = new_subfolder(folder) / base
    path.write_bytes(content)
    return path


def new_subfolder(folder: Path) -> Path:
    """A fresh folder under `folder` with a name nobody chose (two uploads of `t1.nii.gz` never meet)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / secrets.token_hex(6)
    target.mkdir()
    return target


def data_files(root: Path) -> tuple[list[str], list[str]]:
    """The image files and the label maps under the data folder, as paths relative to it (hidden folders skipped), in
    one walk: it ends once the images reach the listing's limit."""
    images, label_maps = [], []
    for folder, subfolders, files in os.walk(root, followlinks=False):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if _is_image(name):
                images.append(path.relative_to(root).as_posix())
                if len(images) >= MAX_LISTED_FILES:
                    return images, label_maps
            elif is_label_map(name) and len(label_maps) < MAX_LISTED_FILES and is_label_map_file(path):
                label_maps.append(path.relative_to(root).as_posix())
    return images, label_maps
