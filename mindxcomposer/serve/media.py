"""`image_url` / `video_url` parts to what `IXCImageProcessor` takes: a PIL image or a local path.

Accepted URLs:
- `data:<mime>;base64,<data>`: decoded in memory (images only);
- a local path or `file://` URL, only inside a directory given with `--allow-dir` (resolved with symlinks,
  so `..` or a link cannot leave it); a video extension makes it a video, as in `model.chat`;
- `http(s)://`, only when the server allows it, fetched with a timeout and a size cap.
Anything else, or bytes that Pillow cannot decode, is a 400 error naming the part.
"""
import base64
import binascii
import io
import os
import warnings
from typing import Sequence
from urllib.parse import unquote, urlparse

from PIL import Image

from ..constants import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from ..errors import InputError
from ..image_processing import load_image
from .errors import bad_request

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT = 10.0


class MediaPolicy:
    """Where images may come from. `allow_dirs`: directories local paths must lie in (none: no local
    files); `allow_http`: whether http(s) URLs are fetched; `max_bytes`: cap on a decoded or fetched image;
    `timeout`: seconds for one fetch."""

    def __init__(self, allow_dirs: Sequence[str] = (), allow_http: bool = True,
                 max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, timeout: float = DEFAULT_FETCH_TIMEOUT):
        self.allow_dirs = [os.path.realpath(d) for d in allow_dirs]
        self.allow_http = allow_http
        self.max_bytes = max_bytes
        self.timeout = timeout


def decode_image_bytes(data: bytes, where: str) -> Image.Image:
    """Bytes -> decoded RGB PIL image, with the checks `load_image` applies to files."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise bad_request(f"{where}: the image is too large: {e}", code="image_too_large")
        except (OSError, SyntaxError, ValueError) as e:
            raise bad_request(f"{where}: cannot decode the image: {e}", code="invalid_image")
    try:
        return load_image(img)
    except InputError as e:
        raise bad_request(f"{where}: {e}", code="invalid_image")


def _data_url(url: str, where: str, policy: MediaPolicy) -> Image.Image:
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(f"{where}: a data URL must look like data:image/png;base64,<data>", code="invalid_image_url")
    mime = header[:-len(";base64")].lower()
    if mime and not mime.startswith("image/"):
        raise bad_request(f"{where}: data URLs must hold an image (image/*), got {mime!r}", code="invalid_image_url")
    if len(payload) > (policy.max_bytes * 4) // 3 + 4:
        raise bad_request(f"{where}: the image is larger than {policy.max_bytes} bytes", code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{where}: invalid base64 data: {e}", code="invalid_base64")
    return decode_image_bytes(data, where)


def _local_path(url: str, where: str, policy: MediaPolicy) -> str:
    path = unquote(urlparse(url).path) if url.startswith("file://") else url
    if not policy.allow_dirs:
        raise bad_request(f"{where}: local files are not served (start the server with --allow-dir DIR)",
                          code="invalid_image_url")
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, d]) == d for d in policy.allow_dirs):
        raise bad_request(f"{where}: {path!r} is outside the allowed directories", code="invalid_image_url")
    if os.path.isdir(real):
        raise bad_request(f"{where}: {path!r} is a directory, not an image or video file", code="invalid_image_url")
    ext = os.path.splitext(real)[1].lower()
    if ext not in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
        raise bad_request(f"{where}: unsupported file extension {ext or '(none)'!r}; accepted: "
                          f"{', '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))}", code="invalid_image_url")
    if not os.path.isfile(real):
        raise bad_request(f"{where}: no such file {path!r}", code="invalid_image_url")
    return real


async def fetch_http(url: str, where: str, policy: MediaPolicy, client) -> Image.Image:
    """GET an image with `client` (an `httpx.AsyncClient`), stopping at `policy.max_bytes`."""
    import httpx

    if not policy.allow_http:
        raise bad_request(f"{where}: http(s) image URLs are disabled on this server", code="invalid_image_url")
    chunks, size = [], 0
    try:
        async with client.stream("GET", url, timeout=policy.timeout, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise bad_request(f"{where}: fetching {url!r} returned HTTP {resp.status_code}",
                                  code="image_fetch_failed")
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise bad_request(f"{where}: the image at {url!r} is larger than {policy.max_bytes} bytes",
                                      code="image_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise bad_request(f"{where}: cannot fetch {url!r}: {type(e).__name__}: {e}", code="image_fetch_failed")
    return decode_image_bytes(b"".join(chunks), where)


async def resolve(url: str, where: str, policy: MediaPolicy, client=None):
    """One part's URL -> PIL image (data, http) or validated local path (images and videos)."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: the url must be a non-empty string", code="invalid_image_url")
    scheme = urlparse(url).scheme.lower()
    if url.startswith("data:"):
        return _data_url(url, where, policy)
    if scheme in ("http", "https"):
        return await fetch_http(url, where, policy, client)
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return _local_path(url, where, policy)
    raise bad_request(f"{where}: unsupported URL scheme {scheme!r} (data:, http(s)://, file:// or a path)",
                      code="invalid_image_url")
