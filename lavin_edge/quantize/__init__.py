"""GPTQ 4-bit quantization of a merged LaVIN: the algorithm (``gptq``), the layer-by-layer driver
(``pipeline``), quality checks (``quality``), the HF export (``export``) and the ``lavin-edge quantize`` step
(``run.quantize_dir``: a merged dir -> a quantized one)."""
