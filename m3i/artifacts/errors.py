"""The one family of errors for an artifact that m3i will not read: unsafe, or damaged.

Wherever an artifact is read (a resume, ``train.init_from``, ``m3i export``, ``m3i evaluate
--model``, ``m3i promote``, a training or evaluation loader), what is wrong with it surfaces as one
of these, with a one-line message that names the artifact, what is wrong and the way out; the
command line prints it as one line and exits 1 (:func:`m3i.cli.main`).

* :class:`UnsafeCheckpointError`: a file holds something that could run code when read (a
  planted pickle) or a format m3i cannot vouch for. Nothing of it was loaded.
* :class:`DamagedArtifactError`: truncated, altered or missing parts (a checkpoint file whose
  size or sha256 is not its manifest's, a ``model.safetensors`` that does not parse or is not
  the one ``export.json`` lists, a data set whose index names shards that are gone).

All are ``ValueError``: the artifact handed in is not a value m3i can use, and the callers that
make every rank fail together on a bad input (``train.init_from``) or set a bad candidate aside
(``m3i promote``) treat them as such.
"""

from __future__ import annotations

from m3i.storage import StorageError

__all__ = ["ArtifactError", "DamagedArtifactError", "DamagedFileError", "UnsafeCheckpointError", "damaged", "first_line"]


class ArtifactError(ValueError):
    """An artifact m3i refuses to read; the message is one line naming it, what is wrong and the way out."""


class UnsafeCheckpointError(ArtifactError):
    """A checkpoint file holds something other than tensors and plain data (a planted pickle, a foreign format)."""


class DamagedArtifactError(ArtifactError):
    """An artifact with truncated, altered or missing parts."""


class DamagedFileError(DamagedArtifactError, StorageError):
    """One file of an artifact is not what its manifest records, found when it was read.

    Also a :class:`m3i.storage.StorageError`, as a read that failed: callers that handled a failed
    download handle this one too.
    """


def first_line(e: BaseException) -> str:
    """``TypeName: first line of the message`` (a library's error can run to many lines)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def damaged(what: str, uri: str, why: str, way_out: str = "") -> DamagedArtifactError:
    """The error for a damaged artifact, in the one shape: ``<what> <uri> is damaged: <why>; <way out>``."""
    return DamagedArtifactError(f"{what} {uri} is damaged: {why}" + (f"; {way_out}" if way_out else ""))
