"""Records -> tokenised examples + preprocessed images, and batches for ``LaVIN``.

Everything that can fail (unreadable images, samples with no answer left after truncation) is found once,
up front, so a bad record is reported with its id before training starts instead of killing step 5000,
and so every rank sees the same sample list (DDP needs identical lengths)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from lavin_edge.data.image import ImageError, load_image
from lavin_edge.data.records import Problems, Record
from lavin_edge.model.lavin import IGNORE_INDEX, Batch, Example, TokenizerLike, collate, encode_example


@dataclass
class Item:
    example: Example
    image: torch.Tensor | None


class LavinDataset(Dataset):
    """Tokenised records. ``max_len`` counts the modality token; longer samples are cut at the end (as LaVIN
    does); a sample whose answer is cut away entirely is reported as bad."""

    def __init__(self, records: list[Record], tok: TokenizerLike, n_visual: int, image_size: int,
                 max_len: int, problems: Problems, check_images: bool = True) -> None:
        self.tok, self.n_visual, self.image_size, self.max_len = tok, n_visual, image_size, max_len
        bad_images: dict[str, str] = {}
        if check_images:
            for path in sorted({r.image for r in records if r.image is not None}):
                try:
                    load_image(path, image_size)
                except ImageError as e:
                    bad_images[path] = e.reason
        self.records: list[Record] = []
        self.examples: list[Example] = []
        for r in records:
            if r.image is not None and r.image in bad_images:
                problems.report(r.id, r.source, f"unusable image {r.image}: {bad_images[r.image]}")
                continue
            ex = encode_example(tok, r.prompt, r.answer, r.image is not None, n_visual, history=r.history)
            if len(ex.input_ids) + 1 > max_len:
                keep = max_len - 1
                ex = Example(ex.input_ids[:keep], ex.labels[:keep], ex.image_pos)
                if all(lab == IGNORE_INDEX for lab in ex.labels):
                    problems.report(r.id, r.source, f"prompt alone exceeds max_seq_len {max_len}")
                    continue
            self.records.append(r)
            self.examples.append(ex)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Item:
        r = self.records[i]
        image = None if r.image is None else load_image(r.image, self.image_size)
        return Item(self.examples[i], image)

    def counts(self) -> dict[str, int]:
        """Samples per source and per modality (what ``--dry-run`` prints)."""
        c: Counter[str] = Counter()
        for r in self.records:
            c[f"source:{r.source}"] += 1
            c["with_image" if r.image is not None else "text_only"] += 1
        c["total"] = len(self.records)
        c["answer_tokens"] = sum(sum(lab != IGNORE_INDEX for lab in e.labels) for e in self.examples)
        c["max_tokens"] = max((len(e.input_ids) + 1 for e in self.examples), default=0)
        return dict(c)


def collate_items(items: list[Item], pad_id: int) -> Batch:
    """Mixed batches are fine: text-only rows get a zero image and route on modality token 0."""
    return collate([it.example for it in items], [it.image for it in items], pad_id)
