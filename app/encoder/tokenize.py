"""Tokenise prompts without torch: the `tokenizers` package over a tokenizer file written at export time.

Two open_clip tokenizers have a file form, and each is reproduced exactly (tests/app/test_torch_free.py
compares them on many prompts):

- `clip-bpe`, open_clip's `SimpleTokenizer` (CLIP's byte-level BPE with `</w>` word ends): the file holds its
  vocabulary and merges; the text is cleaned as open_clip does (ftfy, HTML unescape, whitespace, lower case),
  then `[sot] + tokens + [eot]`, cut to the context length with `eot` kept last, padded with 0;
- `hf`, open_clip's `HFTokenizer` (the stand-in's MiniLM): the Hugging Face fast tokenizer's own file,
  whitespace-cleaned, truncated and padded to the context length.

Any other tokenizer (SigLIP's, reduction masks, ...) has no file form: such a model is served with torch.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

TokenizerKind = Literal["clip-bpe", "hf"]
TOKENIZER_FILE = "tokenizer.json"
# open_clip's SimpleTokenizer splits cleaned text with this pattern before the byte-level BPE.
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

TokenArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class TokenizerSpec:
    """How to use the tokenizer file: its kind, the cleaning, the context length and the special ids."""

    kind: TokenizerKind
    context_length: int
    lower: bool
    pad_id: int
    sot_id: int | None = None  # clip-bpe only
    eot_id: int | None = None  # clip-bpe only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerSpec:
        return cls(**data)


def clean_text(text: str, *, lower: bool) -> str:
    """open_clip's `basic_clean` + `whitespace_clean` (+ lower case for CLIP's BPE)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = " ".join(text.split())
    return text.lower() if lower else text


class FileTokenizer:
    """Texts -> [n, context_length] int64 token ids, as the open_clip tokenizer it was exported from."""

    def __init__(self, spec: TokenizerSpec, path: Path) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        if spec.kind == "hf":
            self._tokenizer.enable_truncation(max_length=spec.context_length)
            self._tokenizer.enable_padding(length=spec.context_length, pad_id=spec.pad_id)
        else:
            self._tokenizer.no_truncation()
            if spec.sot_id is None or spec.eot_id is None:
                raise ValueError("a clip-bpe tokenizer needs its sot and eot ids")
        self._sot, self._eot = spec.sot_id or 0, spec.eot_id or 0

    def __call__(self, texts: Sequence[str]) -> TokenArray:
        cleaned = [clean_text(t, lower=self.spec.lower) for t in texts]
        length = self.spec.context_length
        out = np.full((len(cleaned), length), self.spec.pad_id, dtype=np.int64)
        encodings = self._tokenizer.encode_batch(cleaned, add_special_tokens=self.spec.kind == "hf")
        for row, encoding in enumerate(encodings):
            ids = encoding.ids
            if self.spec.kind == "clip-bpe":
                ids = [self._sot, *ids, self._eot]
                if len(ids) > length:
                    ids = [*ids[: length - 1], self._eot]
            out[row, : len(ids)] = ids
        return out


# ---- export (needs open_clip, so only at build/export time) -----------------------------------------------
def write_tokenizer_file(tokenizer: Any, path: Path) -> TokenizerSpec | None:
    """Write `tokenizer` (an open_clip tokenizer) to `path` (tokenizers' JSON); None if it has no file form."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer, _clean_lower, _clean_whitespace

    if isinstance(tokenizer, SimpleTokenizer):
        if tokenizer.reduction_fn is not None or tokenizer.clean_fn not in (_clean_lower, _clean_whitespace):
            return None
        if len(tokenizer.all_special_ids) != 2:
            return None
        _clip_bpe(tokenizer).save(str(path))
        return TokenizerSpec(
            "clip-bpe",
            int(tokenizer.context_length),
            tokenizer.clean_fn is _clean_lower,
            0,
            int(tokenizer.sot_token_id),
            int(tokenizer.eot_token_id),
        )
    if isinstance(tokenizer, HFTokenizer):
        backend = getattr(tokenizer.tokenizer, "backend_tokenizer", None)
        pad_id = tokenizer.tokenizer.pad_token_id
        if tokenizer.tokenizer_mode or tokenizer.strip_sep_token or backend is None or pad_id is None:
            return None
        if tokenizer.clean_fn is not _clean_whitespace:
            return None
        backend.save(str(path))
        return TokenizerSpec("hf", int(tokenizer.context_length), False, int(pad_id))
    return None


def _clip_bpe(tokenizer: Any) -> Any:
    """CLIP's BPE as a `tokenizers` model: open_clip's vocabulary and merge ranks, `</w>` word ends."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    bpe = Tokenizer(models.BPE(vocab=dict(tokenizer.encoder), merges=merges, end_of_word_suffix="</w>"))
    # open_clip matches its special tokens as whole words anywhere in the text, before the split.
    bpe.add_special_tokens([tokenizer.decoder[i] for i in tokenizer.all_special_ids])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return bpe
