"""Finding and reading webdataset shards (img2dataset layout: KEY.jpg + KEY.txt + KEY.json in a .tar).

Where a shard lives: a local path; any URL fsspec opens (s3://, gs:// with gcsfs, http(s)://, ...), chained
URLs included (simplecache::s3://...); or webdataset's `pipe:CMD`, whose stdout is the tar (`pipe:aws s3 cp
s3://b/00000.tar -`). Credentials and endpoints are those libraries' own (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
~/.aws, GOOGLE_APPLICATION_CREDENTIALS): memscan's config holds none.

Reading is streaming (`tarfile` in "r|*" mode: one pass, no seeks, no local copy; works on pipes and on object
stores, reads gzip/bz2/xz-compressed tars as webdataset does) and never raises on data: a member it cannot use (a
link, a device, a name that is no KEY.EXT) becomes an error row, and a truncated or corrupt tar yields every sample
read before the damage followed by one shard-level error row; so does a file that is not a tar, a tar with no
samples, an object that does not exist, and a `pipe:` command that fails. Tar member names are only ever parsed as
strings, never used as filesystem paths.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import tarfile
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from scanner.errors import ShardSpecError

log = logging.getLogger("memscan")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_EXTS = ("txt",)
META_EXTS = ("json",)
# One member this large is refused (an image or caption, not a video); keeps a bad shard from
# exhausting worker memory.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
# Captions are cut to this many characters: far beyond any text encoder's context (CLIP: 77 tokens), and
# a crawl's megabyte "alt text" would otherwise be copied into every output table.
MAX_CAPTION_CHARS = 16_384

PIPE = "pipe:"
# An object is read in one pass through fsspec's read-ahead cache: one ranged GET per this many bytes, and at most
# this much of a shard in memory at a time. 16 MiB keeps a request's latency (~10-50 ms on S3) small next to its
# transfer, and a 2 GB shard at ~130 requests. HTTP(S) is read as one streamed GET instead (block size 0): servers
# need not support ranges (python's http.server does not).
READ_BLOCK_BYTES = 16 << 20
# Up to this many members of a brace range under one parent are checked one request each (HEAD); more, and the
# parent is listed once (1 request per 1000 objects on S3) and each member looked up in the listing.
PER_OBJECT_CHECKS_MAX = 8
CHECK_THREADS = 16  # concurrent per-object checks where a listing is refused (HTTP, a policy without ListBucket)
# After a pipe: command's output has been read to its end, how long it may take to exit before it is killed.
PIPE_EXIT_WAIT_S = 60.0
PIPE_STDERR_TAIL = 600  # characters of a failed command's stderr quoted in its error row

_GLOB_CHARS = re.compile(r"[*?\[]")
# webdataset's convention: the key is the member path up to the first dot of its basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
# a URL (s3://...) or an fsspec chain (simplecache::s3://...); "file://" is read as the local path it names
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(?:://|::)")
_STREAMED = ("http://", "https://")
_TAR_NAME = re.compile(r"\.(?:tar(?:\.[A-Za-z0-9]+)?|tgz)$")


class ShardList(list):
    """expand_shards' answer: sorted shard paths and URLs (str); `missing`: those a brace range named that did not
    exist when listed (each is read as one error row).

    Expanding a ShardList again returns it unchanged: the driver's one expansion is handed on (to the embedder's
    training sample, to the held-out scoring) without listing the store again, and a missing member stays a member
    rather than becoming a path that "does not exist".
    """

    def __init__(self, paths=(), missing=()):
        super().__init__(paths)
        self.missing = tuple(missing)


def _brace_expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def is_url(path: str) -> bool:
    """Whether `path` is read through fsspec (a URL or an fsspec chain) rather than as a local path or a pipe."""
    s = str(path)
    return bool(_URL.match(s)) and not s.startswith("file://")


def expand_shards(spec: str | os.PathLike | list, strict: bool = False) -> ShardList:
    """Expand shard specs into the shards to read: a directory or prefix, a glob, a brace pattern
    (``shards/{00000..00099}.tar``), a single shard, or a list of them; local, a URL (``s3://b/p/{0..9}.tar``,
    ``gs://``, ``http(s)://``, ``simplecache::s3://...``) or ``pipe:CMD`` (brace-expanded, not checked: the command
    runs when its shard is read).

    Returns a ShardList: sorted, de-duplicated absolute local paths and URLs. A member of a brace range that does
    not exist stays in it (and in `.missing`): the read stage makes one error row of it, and the rest is scanned;
    with `strict` it raises instead. Raises ShardSpecError naming the entry when a path that is not a brace range
    does not exist, when no member of a brace range exists, when an entry matches no .tar shard, when the whole spec
    is empty, or when two shards would share an output name (shard_name).

    Object stores are listed, not probed: the members of a brace range under one parent prefix cost one listing of
    that prefix (one request per 1000 objects on S3), not one HEAD each, unless the store refuses to list.
    """
    if isinstance(spec, ShardList):  # listed already; strict still holds for the members it found missing
        if strict and spec.missing:
            raise ShardSpecError(f"shard path {spec.missing[0]!r} does not exist ({len(spec.missing)} of {len(spec)} "
                                 "shards are missing); data.strict_shards is true, so a missing shard stops the scan")
        return spec
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    parts = [str(item).strip() for item in items if str(item).strip()]
    if not parts:
        raise ShardSpecError("no shards given: pass a directory, a glob or a brace pattern such as "
                             "'shards/{00000..00099}.tar' (local, s3://, gs://, http(s)://) or 'pipe:CMD'")
    found: list[str] = []
    missing: list[str] = []
    for part in parts:
        if part.startswith(PIPE):
            got, lost = _brace_expand(part), []
        elif is_url(part):
            got, lost = _expand_url(part, strict)
        else:
            got, lost = _expand_local(part.removeprefix("file://"), strict)
        if not got and not lost:
            raise ShardSpecError(f"{part!r} matches no .tar shard")
        found += got
        missing += lost
    out = ShardList(sorted(set(found) | set(missing)), sorted(set(missing)))
    _check_names(out)
    return out


def _judge_missing(part: str, patterns: list[str], missing: list[str], strict: bool) -> None:
    """Raise for missing members the scan cannot go on without; log the ones that become error rows."""
    if not missing:
        return
    if len(patterns) == 1:  # no brace range: a typo in the path, refused at once
        raise ShardSpecError(f"shard path {missing[0]!r} does not exist (from {part!r})")
    if len(missing) == len(patterns):
        raise ShardSpecError(f"shard path {missing[0]!r} does not exist (from {part!r}: none of its {len(patterns)} "
                             "members exists)")
    listed = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    if strict:
        raise ShardSpecError(f"shard path {missing[0]!r} does not exist (from {part!r}: {len(missing)} of its "
                             f"{len(patterns)} members are missing: {listed}); data.strict_shards is true, so a missing "
                             "shard stops the scan: set it to false to scan the rest, each missing shard an error row")
    log.warning("%d of the %d shards of %r do not exist (%s): each becomes an error row (data.strict_shards: true "
                "refuses the scan instead)", len(missing), len(patterns), part, listed)


def _expand_local(part: str, strict: bool) -> tuple[list[str], list[str]]:
    patterns = _brace_expand(os.path.expanduser(part))
    found: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found += sorted(glob.glob(os.path.join(pattern, "*.tar")))
        elif _GLOB_CHARS.search(pattern):
            found += sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        elif os.path.isfile(pattern):
            found.append(pattern)
        else:
            missing.append(pattern)
    _judge_missing(part, patterns, missing, strict)
    return [str(Path(p).resolve()) for p in found], [str(Path(p).resolve()) for p in missing]


def _filesystem(url: str, part: str):
    """The fsspec filesystem of `url` (no chain), or ShardSpecError naming what to install or fix."""
    import fsspec

    try:
        fs, _ = fsspec.core.url_to_fs(url)
    except ImportError as e:
        extra = " (pip install 'memscan[gcs]')" if url.startswith(("gs://", "gcs://")) else ""
        raise ShardSpecError(f"{part!r}: reading {url.split(':', 1)[0]}:// needs a package that is not installed{extra}: "
                             f"{e}") from None
    except ValueError as e:
        raise ShardSpecError(f"{part!r}: {e}; memscan reads local paths, URLs that fsspec knows (s3://, gs://, "
                             "http(s)://, ...), fsspec chains (simplecache::s3://...) and pipe:CMD") from None
    return fs


def _expand_url(part: str, strict: bool) -> tuple[list[str], list[str]]:
    """A URL entry: its members as URLs (the chain, such as simplecache::, kept in front of each)."""
    import fsspec

    chain, sep, inner = part.rpartition("::")
    prefix = chain + sep
    if prefix:
        try:
            fsspec.core.url_to_fs(part)  # the chain's own protocols exist (the listing goes to the target alone)
        except (ImportError, ValueError) as e:
            raise ShardSpecError(f"{part!r}: {type(e).__name__}: {e}") from None
    fs = _filesystem(inner, part)
    fs.invalidate_cache()  # listings cached earlier in this process (fsspec keeps them) may predate an upload
    streamed = inner.startswith(_STREAMED)
    patterns = _brace_expand(inner)
    paths = [fs._strip_protocol(p) for p in patterns]
    # HTTP has no listing (an HTML page of links is not one) and '?' starts a query: every URL names one object
    globs = {p for p in paths if not streamed and _GLOB_CHARS.search(p)}
    kinds = _kinds(fs, [p for p in paths if p not in globs], listable=not streamed, part=part)
    found: list[str] = []
    missing: list[str] = []
    for pattern, path in zip(patterns, paths):
        if path in globs or kinds[path] == "directory":
            where = path if path in globs else path.rstrip("/") + "/*.tar"
            found += sorted(n for n, info in _glob(fs, where, part).items() if info.get("type") == "file")
        elif kinds[path] is not None:
            found.append(path)
        else:
            missing.append(pattern)
    _judge_missing(part, patterns, missing, strict)
    return [prefix + fs.unstrip_protocol(p) for p in found], [prefix + fs.unstrip_protocol(fs._strip_protocol(m))
                                                               for m in missing]


def _glob(fs, pattern: str, part: str) -> dict:
    try:
        return fs.glob(pattern, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as e:  # noqa: BLE001 - any storage failure is the user's to fix: say which entry and why
        raise ShardSpecError(f"cannot list {fs.unstrip_protocol(pattern)!r} (from {part!r}): {type(e).__name__}: {e}"
                             f"{_CREDENTIALS}") from None


_CREDENTIALS = ("; credentials and endpoints come from the storage library's environment and profiles "
                "(s3://: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws; gs://: "
                "GOOGLE_APPLICATION_CREDENTIALS)")


def _kinds(fs, paths: list[str], listable: bool, part: str) -> dict[str, str | None]:
    """path -> "file", "directory" or None (does not exist), from one listing per parent where there are more than
    PER_OBJECT_CHECKS_MAX paths under it and the store lists; from one request per path otherwise."""
    kinds: dict[str, str | None] = {}
    by_parent: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        by_parent[fs._parent(p)].append(p)
    one_by_one: list[str] = []
    for parent, members in by_parent.items():
        listing = _listing(fs, parent) if listable and len(members) > PER_OBJECT_CHECKS_MAX else None
        if listing is None:
            one_by_one += members
        else:
            kinds.update({m: listing.get(m.rstrip("/")) for m in members})

    def check(p: str) -> tuple[str, str | None]:
        try:
            return p, fs.info(p).get("type", "file")
        except FileNotFoundError:
            return p, None
        except Exception as e:  # noqa: BLE001 - any storage failure is the user's to fix: say which shard and why
            raise ShardSpecError(f"cannot check shard {fs.unstrip_protocol(p)!r} (from {part!r}): "
                                 f"{type(e).__name__}: {e}{_CREDENTIALS}") from None

    if len(one_by_one) > 1:
        with ThreadPoolExecutor(min(CHECK_THREADS, len(one_by_one))) as pool:
            kinds.update(pool.map(check, one_by_one))
    else:
        kinds.update(map(check, one_by_one))
    return kinds


def _listing(fs, parent: str) -> dict[str, str] | None:
    """{path: type} of everything directly under `parent` ({} when it does not exist), or None when the store
    refuses to list it (the caller then checks each path on its own)."""
    try:
        entries = fs.ls(parent, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as e:  # noqa: BLE001 - PermissionError (no ListBucket), NotImplementedError, ...: check each path
        log.debug("listing %s refused (%s: %s): checking each shard on its own", parent, type(e).__name__, e)
        return None
    return {str(e["name"]).rstrip("/"): e.get("type", "file") for e in entries}


def shard_object(path: str) -> str | None:
    """The local path or URL of the object a shard spec reads: the path or URL itself, a chained URL's target
    (``simplecache::s3://b/x.tar`` -> ``s3://b/x.tar``), or for ``pipe:CMD`` the first word of the command that
    names a .tar (``pipe:aws s3 cp s3://b/x.tar -`` -> ``s3://b/x.tar``; None when no word does)."""
    s = str(path)
    if not s.startswith(PIPE):
        return s.rpartition("::")[2] if is_url(s) else s
    try:  # shell words, with ; | & ( ) split off ("cat x.tar; exit 3"); quotes removed ('gs://b/my dir/x.tar')
        lexer = shlex.shlex(s[len(PIPE):], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:  # unbalanced quotes: the shell will say so when it runs; the name comes from plain words
        words = s[len(PIPE):].split()
    for w in words:
        if _TAR_NAME.search(urlsplit(w).path if w.startswith(_STREAMED) else w):
            return w
    return None


def shard_name(path: str) -> str:
    """Output name of a shard: the base name of the object it reads, without .tar.

    ``/data/00012.tar``, ``s3://b/p/00012.tar``, ``simplecache::s3://b/p/00012.tar``, ``https://h/p/00012.tar?sig=x``
    and ``pipe:aws s3 cp s3://b/p/00012.tar -`` are all ``00012``. Raises ShardSpecError for a pipe: command that
    names no .tar file.
    """
    s = str(path)
    obj = shard_object(s)
    if obj is None:
        raise ShardSpecError(f"the pipe: command {s!r} names no .tar file: memscan names each shard's outputs after the "
                             "tar the command reads, e.g. 'pipe:aws s3 cp s3://bucket/00000.tar -'")
    if is_url(obj):  # an HTTP URL's query (a signature) is not part of the object's name; an S3 key's '?' is
        obj = urlsplit(obj).path if obj.startswith(_STREAMED) else obj.split("://", 1)[-1]
    return os.path.basename(obj).removesuffix(".tar")


def _check_names(paths: list[str]) -> None:
    """Refuse two shards that would write the same output file (parts/NAME.parquet)."""
    seen: dict[str, str] = {}
    for p in paths:
        name = shard_name(p)
        if not name:
            raise ShardSpecError(f"shard {p!r} has an empty name: memscan names each shard's outputs after its file "
                                 "name without .tar")
        other = seen.setdefault(name, p)
        if other != p:
            raise ShardSpecError(f"shards {other!r} and {p!r} would both be named {name!r}: memscan writes one output "
                                 f"per shard name (parts/{name}.parquet), so shard file names must be unique across a "
                                 "scan; rename one, or scan them separately")


def _sample_row(key: str, shard: str, members: dict[str, bytes], member_errors: list[str]) -> dict:
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    caption = None
    error = "; ".join(member_errors) or None
    if "txt" in members:
        # Invalid UTF-8 is mangled, not refused: the image is fine and the caption is still mostly readable.
        caption = members["txt"].decode("utf-8", errors="replace").strip()[:MAX_CAPTION_CHARS]
    if image_ext is None and error is None:
        found = ", ".join(sorted(members)) or "nothing"
        error = f"no image member (found: {found}; accepted: {', '.join(IMAGE_EXTS)})"
    return {
        "key": key,
        "shard": shard,
        "image": members.get(image_ext) if image_ext else None,
        "ext": image_ext,
        "caption": caption,
        "json": members.get("json"),
        "error": error,
    }


def _split_name(name: str) -> tuple[str, str | None]:
    """Member name -> (key, lower-case extension), or (name, None) when it names no sample."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (name, None)


def _key_problem(key: str) -> str | None:
    """Why a key cannot be reported as it is (keys end up in parquet and one a line in removal_list.txt)."""
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in key):  # tarfile's surrogateescape for bytes that are not UTF-8
        return "is not valid UTF-8"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "has a control character"
    return None


def _printable_key(key: str) -> str:
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_MEMBER_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
                 tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


def _member_kind(info: tarfile.TarInfo) -> str:
    kind = _MEMBER_KINDS.get(info.type, f"member of tar type {info.type!r}")
    return f"{kind} to {info.linkname!r}" if info.linkname else kind


def _end_recorder() -> tuple[type, dict]:
    """A TarInfo class that records why the archive's member loop ended, and the dict it writes to.

    tarfile ends the loop without an exception when, after the first member, the data runs out at a
    header (a tar cut between members or inside a header) or a header fails its checksum: every sample
    behind that point would be lost without a word. TarInfo.fromtarfile reads each header, so it sees
    which of these it was.
    """
    end: dict = {}

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf):
            try:
                return super().fromtarfile(tf)
            except tarfile.HeaderError as e:
                end["error"], end["offset"] = e, tf.offset
                raise

    return RecordingTarInfo, end


def _trailing_data(tf: tarfile.TarFile) -> bool:
    """Whether anything but zero padding follows the end-of-archive block (e.g. `cat a.tar b.tar`)."""
    read = getattr(tf.fileobj, "read", None)
    if read is None:
        return False
    while chunk := read(1 << 16):
        if chunk.strip(b"\0"):
            return True
    return False


def _unread_tail(tf: tarfile.TarFile, end: dict) -> str | None:
    """Why a member loop that ended without an exception did not reach the real end of the shard, or None."""
    err, at = end.get("error"), end.get("offset")
    if isinstance(err, tarfile.EOFHeaderError):  # a zero block: the end-of-archive marker
        if _trailing_data(tf):
            return (f"the shard goes on after its end-of-archive marker at byte {at} (tars concatenated, or a "
                    "zeroed block): what follows is not read, as webdataset does not read it either")
        return None
    if isinstance(err, tarfile.EmptyHeaderError):
        return f"the data ends at byte {at}, between two members, without the tar end-of-archive marker"
    if isinstance(err, tarfile.TruncatedHeaderError):
        return f"the data ends at byte {at}, cut inside a member header"
    if isinstance(err, tarfile.InvalidHeaderError):
        return f"corrupt member header at byte {at} ({err}): the rest of the shard is not read"
    return None


class _Pipe:
    """A `pipe:` command whose stdout is read as the shard.

    It never hangs memscan: stdin is /dev/null (a command that reads stdin gets EOF, not the worker's terminal),
    stderr goes to a file (a chatty command cannot fill a pipe and block), and a command still running when memscan
    stops reading is killed with its whole process group (the shell and what it started).
    """

    def __init__(self, shard: str):
        self.cmd = shard[len(PIPE):]
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call: finish() closes it
        self.proc = subprocess.Popen(self.cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr, start_new_session=True)
        self.stdout = self.proc.stdout
        self.done = False

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def abort(self) -> None:
        """Stop the command now, whatever it is doing (its reader is gone)."""
        if not self.done:
            self.done = True
            self._kill()
            self.stdout.close()
            self.proc.wait()
            self.stderr.close()

    def finish(self, read_all: bool) -> str | None:
        """Wait for the command; None when it succeeded, else why not (its exit status and the tail of its stderr).

        read_all: the tar was read to its end (its output is drained first, so the command can exit by itself).
        Otherwise memscan stopped early and closes the pipe: a command still writing dies of SIGPIPE, which is
        memscan's doing and not reported; one that does not exit within 2 s is killed (a command that failed has
        usually exited already: its end of output is what broke the tar).
        """
        if self.done:
            return None
        self.done = True
        try:
            return self._wait(read_all)
        finally:
            self._kill()  # anything the shell left running in the background
            self.stderr.close()

    def _wait(self, read_all: bool) -> str | None:
        try:
            if read_all:
                while self.stdout.read(1 << 16):
                    pass
        except (OSError, ValueError):
            pass
        self.stdout.close()
        try:
            rc = self.proc.wait(timeout=PIPE_EXIT_WAIT_S if read_all else 2.0)
        except subprocess.TimeoutExpired:
            self._kill()
            self.proc.wait()
            if not read_all:
                return None
            return (f"the pipe: command {self.cmd!r} did not exit within {PIPE_EXIT_WAIT_S:g} s of closing its "
                    f"output and was killed{self._stderr_tail()}")
        if rc == 0 or (not read_all and rc in (-signal.SIGPIPE, 128 + signal.SIGPIPE, -signal.SIGKILL)):
            return None
        how = f"was killed by signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exited with status {rc}"
        return f"the pipe: command {self.cmd!r} {how}{self._stderr_tail()}"

    def _stderr_tail(self) -> str:
        self.stderr.seek(0, os.SEEK_END)
        size = self.stderr.tell()
        self.stderr.seek(max(0, size - 4 * PIPE_STDERR_TAIL))
        tail = self.stderr.read().decode("utf-8", "replace").strip()[-PIPE_STDERR_TAIL:]
        return f"; stderr: {tail!r}" if tail else "; no stderr"


@functools.cache
def _remote_errors() -> tuple[type[BaseException], ...]:
    """What reading an object can raise besides OSError: the HTTP and S3 clients' own errors (most of them s3fs and
    fsspec's http already turn into OSError; these are the rest, e.g. a connection dropped mid-body)."""
    errors: list[type[BaseException]] = []
    for module, name in (("aiohttp", "ClientError"), ("botocore.exceptions", "BotoCoreError"),
                         ("botocore.exceptions", "ClientError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _open(shard: str):
    """A binary file object of the shard's bytes, read front to back once (a pipe: command is started elsewhere)."""
    if not is_url(shard):
        return open(shard.removeprefix("file://"), "rb")
    import fsspec

    # HTTP: one streamed GET (block size 0); object stores: ranged GETs of READ_BLOCK_BYTES through fsspec's
    # read-ahead cache, which keeps one block in memory; never a local copy (unless the URL asks for one: simplecache::)
    streamed = shard.rpartition("::")[2].startswith(_STREAMED)
    fs, path = fsspec.core.url_to_fs(shard)
    return fs.open(path, "rb", block_size=0 if streamed else READ_BLOCK_BYTES)


def _size(fileobj) -> int | None:
    """Bytes in the shard when its store says so (a file, an object), None for a stream."""
    size = getattr(fileobj, "size", None)
    if isinstance(size, int):
        return size
    try:
        st = os.fstat(fileobj.fileno())
    except (OSError, AttributeError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None  # a pipe's st_size is 0 whatever flows through it


def iter_tar_samples(path: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Stream one shard (a local path, a URL fsspec opens, or `pipe:CMD`) as sample dicts.

    Each dict: key, shard (the shard's path), image (bytes | None), ext, caption (str | None),
    json (bytes | None), error (str | None). A final dict with key None and an error is yielded
    when the shard does not exist or cannot be opened, is not a tar, is truncated or corrupt, holds no samples, or
    its pipe: command fails (the row names the exit status and the tail of its stderr); samples read before the
    damage are all yielded.

    Keys are webdataset's: the member path up to the first dot of its basename (``a/b.c.jpg`` -> ``a/b``).
    A key met again after other members, or with an extension its sample already has, starts a new
    sample with the same key (nothing is merged or overwritten; the corpus-wide check reports repeats).
    Links, devices and FIFOs are error rows naming the member and its type: they are never followed.
    """
    shard = str(path)
    current: str | None = None
    members: dict[str, bytes] = {}
    member_errors: list[str] = []
    yielded = 0
    opened = False
    tarinfo, end = _end_recorder()

    def row() -> dict:
        problem = _key_problem(current)
        if problem is None:
            return _sample_row(current, shard, members, member_errors)
        return {"key": _printable_key(current), "shard": shard, "image": None, "ext": None, "caption": None,
                "json": None, "error": f"member name {current!r} {problem}: its key cannot be reported"}

    def shard_row(error: str) -> dict:
        return {"key": None, "shard": shard, "image": None, "ext": None, "caption": None, "json": None,
                "error": error}

    pipe = None
    errors: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error)
    try:
        if shard.startswith(PIPE):
            pipe = _Pipe(shard)
            fileobj = pipe.stdout
        else:
            if is_url(shard):
                errors += _remote_errors()
            fileobj = _open(shard)
    except FileNotFoundError as e:
        yield shard_row(f"the shard does not exist: {e}")
        return
    except Exception as e:  # noqa: BLE001 - a shard that cannot be opened is that shard's error row, not a crash
        yield shard_row(f"the shard cannot be opened: {type(e).__name__}: {e}")
        return
    problem = None  # the shard-level error, if any, once the samples are out
    read_all = False
    try:
        try:
            with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=tarinfo) as tf:
                opened = True
                for info in tf:
                    if info.isdir():
                        continue  # a container, not part of a sample (`tar c dir/` writes one); no data is lost
                    key, ext = _split_name(info.name)
                    if ext is None or key != current or ext in members:
                        if current is not None:
                            yield row()
                            yielded += 1
                        current, members, member_errors = key, {}, []
                    kind = None if info.isfile() else _member_kind(info)
                    if ext is None:  # README, ._KEY.jpg (macOS AppleDouble): webdataset skips these too
                        member_errors.append(f"member {info.name!r}{f' ({kind})' if kind else ''} does not name a "
                                             "sample (KEY.EXTENSION): not read")
                        yield row()
                        yielded += 1
                        current = None
                        continue
                    if kind is not None:
                        member_errors.append(f"member {info.name!r} is a {kind}, not a regular file: not read "
                                             "(memscan reads regular files only and never follows a link)")
                        continue
                    if info.size > max_member_bytes:
                        member_errors.append(f"member {info.name!r} is {info.size} bytes (> {max_member_bytes})")
                        continue
                    f = tf.extractfile(info)
                    data = f.read() if f is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name!r} truncated ({len(data)} of {info.size} bytes)")
                    members[ext] = data
                tail = _unread_tail(tf, end)
            read_all = True
        except errors as e:
            if not opened and isinstance(e, tarfile.TarError):  # the first header already failed
                # "empty file": tarfile read no byte at all, where the size is not known up front (a pipe, HTTP)
                empty = _size(fileobj) == 0 or (isinstance(e, tarfile.ReadError) and str(e) == "empty file")
                problem = ("not a tar archive: the file is empty (0 bytes)" if empty else
                           f"not a tar archive: {type(e).__name__}: {e}")
            else:
                # The sample being read when the archive broke is kept only if its image was complete.
                if current is not None and any(x in members for x in IMAGE_EXTS):
                    yield row()
                elif current is not None:
                    yield {"key": _printable_key(current), "shard": shard, "image": None, "ext": None,
                           "caption": None, "json": None,
                           "error": f"sample cut off by a damaged shard: {type(e).__name__}: {e}"}
                problem = f"truncated or corrupt shard: {type(e).__name__}: {e}"
            current = None
        if read_all:
            if current is not None:
                yield row()
                yielded += 1
            if tail is not None:
                problem = f"truncated or corrupt shard: {tail}"
            elif yielded == 0:
                problem = "the shard holds no samples (an empty tar, or only directories)"
        failed = pipe.finish(read_all) if pipe is not None else None
        if failed is not None:  # the command's failure is the cause; what it left unreadable is its consequence
            problem = failed + (f" (its output: {problem})" if problem else "")
        if problem is not None:
            yield shard_row(problem)
    finally:
        if pipe is not None:
            pipe.abort()  # the consumer stopped early (or an error escaped): no command outlives its shard
        fileobj.close()
