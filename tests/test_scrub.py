"""``scrub``: failure messages lose every path and name-like file/folder name (G2) while
ordinary words that happen to be used as names ("study", "data") stay readable."""

from __future__ import annotations

import os

from medfusion.errors import CorruptFileError
from medfusion.scoring.discovery import StudyRef
from medfusion.scoring.scorer import failure, scrub

ROOT = os.path.join(os.sep, "srv", "batch")


def _ref(folder_name: str, *, identified: bool = False) -> StudyRef:
    folder = os.path.join(ROOT, folder_name)
    public = "st-0123456789ab" if identified else folder_name
    return StudyRef(study_id=public, key="st-0123456789ab", root=ROOT, folder=folder,
                    source_name=folder_name)


def test_ordinary_words_used_as_names_are_not_mangled() -> None:
    ref = _ref("study")
    files = [os.path.join(ref.folder, "data"), os.path.join(ref.folder, "images", "ct")]
    message = ("this study folder holds no data: the images of a ct study need a header; "
               "a study with data is loaded")
    assert scrub(message, ref, files) == message
    # The same names inside a path still go, with the whole path.
    where = f"cannot read {files[1]} (also {ref.folder}{os.sep}other{os.sep}x.dcm) in {ROOT}"
    assert scrub(where, ref, files) == "cannot read <file> (also <study>) in <root>"
    assert scrub(f"see images{os.sep}ct here", ref, files) == "see <file> here"


def test_a_patient_named_folder_never_survives() -> None:
    ref = _ref("Doe_John_1970")
    files = [os.path.join(ref.folder, "IMG_Doe_0001.dcm"),
             os.path.join(ref.folder, "Doe_John_1970", "x.dcm")]
    message = (f"'{files[0]}' failed; folder Doe_John_1970 (DOE_JOHN_1970, doe_john_1970.zip) "
               f"holds IMG_Doe_0001.dcm and Doe_John_1970{os.sep}x.dcm under {ref.folder}")
    out = scrub(message, ref, files)
    assert "doe" not in out.casefold() and "1970" not in out and ROOT not in out
    assert out.startswith("'<file>' failed; folder <name> (<name>, <name>.zip) holds <name>")
    # Whole tokens only: a longer token that merely contains a name is another word.
    assert scrub("IMG_Doe_0001.dcm2", ref, files) == "IMG_Doe_0001.dcm2"


def test_a_plain_word_folder_holding_identifiers_is_removed_anywhere() -> None:
    """When discovery found the folder name holds the patient's identifiers its public id
    is the pseudonym: then even a plain word ("smith") is removed as a name."""
    ref = _ref("smith", identified=True)
    out = scrub("the smith folder (Smith) failed", ref, [os.path.join(ref.folder, "a.dcm")])
    assert out == "the <name> folder (<name>) failed"
    plain = _ref("smith")  # not identified: its name is the public study_id already
    assert scrub("the smith folder", plain, []) == "the smith folder"


def test_failure_rows_are_scrubbed() -> None:
    ref = _ref("Doe_John_1970", identified=True)
    path = os.path.join(ref.folder, "ct", "IM0001")
    row = failure(ref, "load", CorruptFileError(f"{path} is corrupt; see Doe_John_1970"), [path])
    assert row == {"study_id": "st-0123456789ab", "stage": "load", "code": "CORRUPT",
                   "message": "<file> is corrupt; see <name>"}


def test_a_folder_name_with_blanks_inside_a_study_never_survives() -> None:
    """A series folder ``John Smith`` quoted as a path: the blank must not end the match of
    the study path and leave the surname behind."""
    ref = _ref("study")
    files = [os.path.join(ref.folder, "John Smith", "IM0001"),
             os.path.join(ref.folder, "a b", "Jane Roe", "IM0002")]
    for folder in (os.path.dirname(files[0]), os.path.dirname(files[1])):
        out = scrub(f"series folder {folder} is incomplete ('{folder}')", ref, files)
        assert out == "series folder <study> is incomplete ('<study>')"
    loose = StudyRef(study_id="st-0123456789ab", key="st-0123456789ab", root=ROOT,
                     files=(os.path.join(ROOT, "Doe John", "x.dcm"),))
    out = scrub(f"cannot read {os.path.join(ROOT, 'Doe John')}", loose, loose.files)
    assert out == "cannot read <root>"
