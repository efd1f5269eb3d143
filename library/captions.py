"""Caption options as sd-scripts applies them (``BaseDataset.process_caption``), re-derived here.

Order, per image and step: ``--caption_prefix`` / ``--caption_suffix`` are joined on with a space;
the whole caption is dropped (``""``) with probability ``--caption_dropout_rate``, and in every
epoch that is a multiple of ``--caption_dropout_every_n_epochs``; otherwise the first line is
taken and, when tags are shuffled or dropped, it is split at ``,`` into tags: the first
``--keep_tokens`` tags (or everything before ``--keep_tokens_separator``, and after a second one)
stay where they are, the others are shuffled (``--shuffle_caption``) and each dropped with
probability ``--caption_tag_dropout_rate``; the tags are joined with ``", "``.

The random draws come from one generator that the training state saves, so a resumed run sees
the captions the uninterrupted one would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SEPARATOR = ","


@dataclass(frozen=True)
class CaptionRules:
    prefix: str | None = None
    suffix: str | None = None
    shuffle: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    tag_dropout_rate: float = 0.0

    @classmethod
    def from_args(cls, args) -> "CaptionRules":
        return cls(args.caption_prefix, args.caption_suffix, bool(args.shuffle_caption), int(args.keep_tokens or 0),
                   args.keep_tokens_separator or None, float(args.caption_dropout_rate or 0.0),
                   int(args.caption_dropout_every_n_epochs or 0), float(args.caption_tag_dropout_rate or 0.0))

    @property
    def active(self) -> bool:
        return self != CaptionRules()

    @property
    def random(self) -> bool:
        """Whether applying the rules draws random numbers (and so needs the generator)."""
        return bool(self.shuffle or self.dropout_rate or self.tag_dropout_rate)

    def apply(self, caption: str, epoch: int, gen: torch.Generator | None) -> str:
        if self.prefix:
            caption = self.prefix + " " + caption
        if self.suffix:
            caption = caption + " " + self.suffix
        dropped = self.dropout_rate > 0 and _uniform(gen) < self.dropout_rate
        if dropped or (self.dropout_every_n_epochs > 0 and epoch % self.dropout_every_n_epochs == 0):
            return ""
        caption = caption.split("\n")[0]
        if not (self.shuffle or self.tag_dropout_rate > 0):
            return caption
        fixed, flex, fixed_tail = self._split(caption)
        if self.shuffle:
            flex = [flex[i] for i in torch.randperm(len(flex), generator=gen).tolist()]
        if self.tag_dropout_rate > 0:
            flex = [t for t in flex if _uniform(gen) >= self.tag_dropout_rate]
        return ", ".join(fixed + flex + fixed_tail)

    def _split(self, caption: str):
        """(fixed head, tags to shuffle / drop, fixed tail)."""
        sep = self.keep_tokens_separator
        if sep and sep in caption:
            head, flex = caption.split(sep, 1)
            tail = ""
            if sep in flex:
                flex, tail = flex.split(sep, 1)
            return _tags(head), _tags(flex), _tags(tail)
        tags = [t.strip() for t in caption.strip().split(SEPARATOR)]
        return tags[:self.keep_tokens], tags[self.keep_tokens:], []


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(SEPARATOR) if t.strip()]


def _uniform(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen))


def class_tokens(folder_name: str) -> str:
    """The class token of a kohya folder: ``10_sks dog`` -> ``sks dog``."""
    head, _, name = folder_name.partition("_")
    return name if head.isdigit() else folder_name
