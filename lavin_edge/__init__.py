"""lavin-edge: LaVIN (Mixture-of-Modality Adaptation) vision-language assistants, trained cheap and served fast.

Data flows one way: base checkpoints -> ``train`` (adapters) -> ``merge`` -> ``quantize`` -> ``chat``.
"""

__version__ = "0.1.0"
