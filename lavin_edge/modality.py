"""The two modalities of a LaVIN sequence, and where its image sits.

A sequence either carries an image (its visual tokens start at ``image_pos``) or it does not
(``image_pos == NO_IMAGE``). The routed adapters of the LLM are chosen per sequence by its modality.
"""

from __future__ import annotations

TEXT, IMAGE = 0, 1  # modality ids (the adapters' routing rows, the modality embedding's rows)
NO_IMAGE = -1  # image_pos of a sequence without an image


def has_image(image_pos: int) -> bool:
    """Whether a sequence whose visual tokens start at ``image_pos`` carries an image."""
    return image_pos >= 0


def modality_of(image_pos: int) -> int:
    """IMAGE for a sequence with an image at ``image_pos``, else TEXT."""
    return IMAGE if has_image(image_pos) else TEXT

