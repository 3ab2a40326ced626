"""Output files: the checks before writing one, and writing it through a temporary name.

Every command refuses to replace an existing output unless asked, and writes under a hidden name beside
the output that is renamed over it at the end, so that a crash, a full disk or Ctrl-C never leaves half a
file under the name the user asked for. Streaming writers (video) keep their own temporary file open for
the whole run; whole files (PNG, exported models) go through `write_through_temporary`.
"""
from __future__ import annotations

import filecmp
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from bgmatte.errors import BgmatteError, OutputExists


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it: done once, at import, before any thread writes
    os.umask(umask)
    return umask


_FILE_MODE = 0o666 & ~_umask()


def default_file_mode() -> int:
    """The permissions a newly created file gets under the umask (0o644 under the usual 022): temporary files
    are created private, and outputs renamed from them should not stay that way."""
    return _FILE_MODE


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside ``path`` for a file being written, with the same extension (muxers read it)."""
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``overwrite``: the one wording every command uses."""
    if not overwrite and os.path.lexists(path):
        raise OutputExists(f"{path}: already exists", "replace it")


def make_folder(folder: Path, what: str = "") -> None:
    """Make ``folder`` (and its parents) to write into, or refuse in one line one that is a file (or a link to
    nowhere), cannot be made or cannot be written in; ``what`` says what it is for, in the first message."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise BgmatteError(f"{folder}: is a file, not a folder{f' (for {what})' if what else ''}")
    _writable(folder, folder, "this folder")


def _writable(folder: Path, subject: Path, called: str) -> None:
    """Make ``folder`` and its parents, and refuse in one line, about ``subject``, one that cannot be made or written
    in; ``called`` is how the message names the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BgmatteError(f"{subject}: cannot create {called} ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BgmatteError(f"{subject}: cannot write in {called} (permission denied)")


def check_destination(path: Path, overwrite: bool, *, folder: bool = False) -> None:
    """Refuse an output that exists (unless ``overwrite``) or that is a folder (unless ``folder``: image
    sequences are written into one), and make its parent folder, refusing one that cannot be written in.
    Done before any slow work, so that the user hears of it at once."""
    if path.is_dir() and not folder:
        raise BgmatteError(f"{path}: is a folder")
    refuse_existing(path, overwrite)
    _writable(path.parent, path, f"the folder {path.parent}")


def write_through_temporary(path: Path, write: Callable[[Path], None], what: str = "",
                            failures: tuple[type[BaseException], ...] = (OSError,), *,
                            temporary: Path | None = None) -> Path:
    """Have ``write`` fill a private temporary file beside ``path``, give it the usual permissions and rename it
    over ``path``. Whatever stops it (an error, Ctrl-C), the temporary file is removed; ``failures`` (some
    writers report a file they cannot write as RuntimeError) become one line naming ``path``. The temporary
    name is a fresh random one unless given (training names its own after the process, to tell a save under
    way from one a killed process left)."""
    folder = path.parent
    try:
        if temporary is None:
            handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=folder)
            temporary = Path(name)
        else:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except FileNotFoundError:
        raise BgmatteError(f"{path}: the folder {folder} does not exist") from None
    except OSError as exc:
        raise BgmatteError(f"{path}: cannot write in {folder} ({exc.strerror or exc})") from None
    try:
        os.fchmod(handle, default_file_mode())
        os.close(handle)
        write(temporary)
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, IsADirectoryError):
            raise BgmatteError(f"{path}: is a folder, so {what or 'the file'} cannot take its place") from None
        if isinstance(exc, failures):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise BgmatteError(f"{path}: cannot write {what + ' ' if what else ''}({reason})") from None
        raise
    return path


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """What `os.path.samefile` compares (device and inode), to tell one file however it is spelled, through a link
    included; None for a path that cannot be read (missing), which its reader names."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def same_bytes(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two files hold the same bytes, as a copy does; False where either cannot be read. Files of different
    sizes are told apart by their sizes alone, so only a copy (or a rare file of the very same size) is read."""
    try:
        if os.stat(first).st_size != os.stat(second).st_size:
            return False
        return filecmp.cmp(first, second, shallow=False)
    except OSError:
        return False


def refuse_overwriting_inputs(outputs: Iterable[Path], inputs: Iterable[tuple[str, Path]], *,
                               advice: str = "choose another output folder") -> None:
    """Refuse an output that is one of the `inputs` ((what, path) pairs) however it is spelled, through a link
    included, since it would destroy what is being read: ``overwrite`` replaces old outputs, never inputs.
    `advice` ends the message."""
    known: dict[tuple[int, int], tuple[str, Path]] = {}
    for what, path in inputs:
        identity = file_identity(path)
        if identity is not None:  # a missing input is named when it is read
            known.setdefault(identity, (what, path))
    for output in outputs:
        identity = file_identity(output)  # None: nothing there yet, so no input either
        found = known.get(identity) if identity is not None else None
        if found is not None:
            raise BgmatteError(f"{output}: this output would overwrite the {found[0]} {found[1]}: {advice}")
