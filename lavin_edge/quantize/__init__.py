"""GPTQ 4-bit quantization of a merged LaVIN: the algorithm (``gptq``), the layer-by-layer driver
(``pipeline``), quality checks (``quality``), the HF export (``export``) and the step (``step.quantize_dir``)."""
