"""`lavin-edge bench quality`: how far what `chat` runs is from the model it was asked to serve.

Every contender reads the same held-out text (``quality_text.txt``, shipped with the package: prose, code,
tables and numbers written for this benchmark) and the same fixed sample of easy-vqa *test* questions, with
teacher forcing, so each position is compared on identical inputs:

- ``fp``: the merged fp model (plain PyTorch);
- ``4-bit exact``: the quantized dir with its weights dequantized exactly, fp32 activations, fp32 head;
- ``engine <isa>``: the quantized dir as ``chat`` runs it on this CPU, one row per kernel backend
  (``LAVIN_EDGE_KERNELS``): the prompt through the prefill (W4 GEMM), every later token through one decode
  step (the native ``DecodeStack``), the lm_head as the engine builds it;
- ``llama.cpp``: where llama-cpp-python is installed, the perplexity of the model's source GGUF on the same
  text (its own tokenizer; the base LLM without the adapters, so a peer figure, not a comparison row).

Rows: perplexity of the text tokens; top-1 agreement at every scored position with the fp model and with the
exact 4-bit model; max and mean absolute logit difference from the exact 4-bit model (and from fp); easy-vqa
accuracy of the greedy answers (judged as ``lavin-edge eval`` judges them) and top-1 agreement along the gold
answers. The CUDA engine is not a row yet (see the README).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lavin_edge.bench.llamacpp import llamacpp_perplexity_row
from lavin_edge.kernels.dispatch import CPU_BACKENDS
from lavin_edge.runtime.compare import top1_matches

QUALITY_TEXT = Path(__file__).with_name("quality_text.txt")
VQA_SEED = 20261130  # the fixed held-out sample of the easy-vqa test split
DEFAULT_VQA = 100
MAX_LEN = 256  # tokens per text segment (prefix included)
ENGINE_BACKENDS = CPU_BACKENDS  # every name a build may have; those available here run


class QualityBenchError(ValueError):
    """Bad input to the benchmark (a model dir, a backend name): one line for the CLI."""


# ------------------------------------------------------------------------------------------------ inputs

def text_segments(tok: Any, text: str | None = None, max_len: int = MAX_LEN) -> list[list[int]]:
    """The text as text-modality sequences ``[BOS]["Image: N/A"][paragraphs]`` of at most ``max_len`` tokens.

    Paragraphs (blank-line separated) are packed whole while they fit; a paragraph longer than a segment is cut
    into consecutive pieces, so every token of the text is scored exactly once."""
    from lavin_edge.model.lavin import encode_example

    text = QUALITY_TEXT.read_text() if text is None else text
    prefix = encode_example(tok, "", None, False, 0).input_ids
    room = max_len - len(prefix)
    if room < 2:
        raise QualityBenchError(f"max_len {max_len} leaves no room after the {len(prefix)}-token prefix")
    paragraphs = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    segments: list[list[int]] = []
    cur: list[int] = []
    for p in paragraphs:
        ids = tok.encode(("\n\n" if cur else "") + p)
        if cur and len(cur) + len(ids) > room:
            segments.append(prefix + cur)
            cur, ids = [], tok.encode(p)
        while len(ids) > room:
            segments.append(prefix + ids[:room])
            ids = ids[room:]
        cur += ids
    if cur:
        segments.append(prefix + cur)
    return segments


def scored_from(tok: Any) -> int:
    """Index of the first position whose next-token prediction is scored: the last prefix token (the prefix
    conditions the text but is not scored, as in ``lavin_edge.quantize.quality.perplexity``)."""
    from lavin_edge.model.lavin import encode_example

    return len(encode_example(tok, "", None, False, 0).input_ids) - 1


@dataclass
class VqaItem:
    record: Any
    prompt_ids: list[int]  # [BOS][image prefix][visual slots][question]
    gold_ids: list[int]  # prompt + gold answer + EOS (teacher forcing along the gold answer)
    image_pos: int
    image: torch.Tensor


def vqa_items(tok: Any, n_visual: int, image_size: int, n: int, seed: int = VQA_SEED) -> list[VqaItem]:
    """``n`` easy-vqa test questions (a fixed seeded sample), targets as the demo was trained on them."""
    from lavin_edge.data.easyvqa import load_easy_vqa
    from lavin_edge.data.image import load_image
    from lavin_edge.data.records import Problems
    from lavin_edge.model.lavin import encode_example

    out = []
    for r in load_easy_vqa("test", Problems(strict=False), "open", limit=n, seed=seed, explain=True):
        prompt = encode_example(tok, r.prompt, None, True, n_visual)
        gold = encode_example(tok, r.prompt, r.answer, True, n_visual)
        out.append(VqaItem(r, prompt.input_ids, gold.input_ids, prompt.image_pos, load_image(r.image, image_size)))
    return out


# ------------------------------------------------------------------------------------------------ running

def teacher_forced_logits(engine: Any, ids: list[int], prompt_len: int, modality: int, image_pos: int = -1,
                          visual: torch.Tensor | None = None, decode: bool = True) -> torch.Tensor:
    """Logits [len(ids), V] of ``engine`` reading ``ids``: with ``decode`` as a chat turn runs, the first
    ``prompt_len`` ids in one prefill and each later id in its own decode step; else all in one prefill."""
    engine.reset(modality)
    h = engine.embed_prompt(ids, image_pos, visual)
    if not decode:
        return engine.forward(h, last_only=False)
    rows = [engine.forward(h[:prompt_len], last_only=False)]
    with torch.inference_mode():
        for t in range(prompt_len, len(ids)):
            rows.append(engine.forward(h[t:t + 1].contiguous()))
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])


@dataclass
class Tally:
    """Running sums of one contender's figures over text (or vqa) positions."""

    positions: int = 0
    nll: float = 0.0
    agree_fp: int = 0
    agree_q4: int = 0
    max_diff_q4: float = 0.0
    sum_diff_q4: float = 0.0
    max_diff_fp: float = 0.0
    sum_diff_fp: float = 0.0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, ref_fp: Reference | None,
            ref_q4: Reference | None, key: int) -> None:
        lp = torch.log_softmax(logits.double(), -1)
        self.nll -= float(lp.gather(1, targets[:, None]).sum())
        self.positions += targets.numel()
        for ref, name in ((ref_fp, "fp"), (ref_q4, "q4")):
            if ref is None:
                continue
            r = ref.logits[key]
            d = (logits - r).abs()
            setattr(self, f"agree_{name}", getattr(self, f"agree_{name}") + top1_matches(logits, r.argmax(-1)))
            setattr(self, f"max_diff_{name}", max(getattr(self, f"max_diff_{name}"), float(d.max())))
            setattr(self, f"sum_diff_{name}", getattr(self, f"sum_diff_{name}") + float(d.mean(-1).sum()))

    def figures(self, prefix: str, has_fp: bool, has_q4: bool) -> dict[str, float | None]:
        n = max(self.positions, 1)
        out: dict[str, float | None] = {f"{prefix}positions": self.positions,
                                        f"{prefix}ppl": math.exp(self.nll / n) if self.positions else None}
        for name, has in (("fp", has_fp), ("q4", has_q4)):
            out[f"{prefix}top1_vs_{name}"] = getattr(self, f"agree_{name}") / n if has else None
            out[f"{prefix}max_logit_diff_vs_{name}"] = getattr(self, f"max_diff_{name}") if has else None
            out[f"{prefix}mean_logit_diff_vs_{name}"] = getattr(self, f"sum_diff_{name}") / n if has else None
        return out


@dataclass
class Reference:
    """A reference contender's logits at the scored positions, keyed by sequence."""

    logits: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Contender:
    name: str
    model_dir: Path
    backend: str  # Engine backend: "torch" or "kernels"
    isa: str | None = None  # LAVIN_EDGE_KERNELS for a kernels engine
    decode: bool = True  # continuation through decode steps (as chat), else one prefill
    reference: bool = False  # the fp or exact 4-bit model: fp32 keys and values (an engine caches them in fp16)


@contextmanager
def kernel_backend(isa: str | None) -> Iterator[None]:
    """``LAVIN_EDGE_KERNELS`` set while an engine is built (the engine binds its backend at load)."""
    old = os.environ.get("LAVIN_EDGE_KERNELS")
    if isa is not None:
        os.environ["LAVIN_EDGE_KERNELS"] = isa
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LAVIN_EDGE_KERNELS", None)
        else:
            os.environ["LAVIN_EDGE_KERNELS"] = old


def head_description(engine: Any) -> str:
    top = getattr(engine.lm_head, "top", None)
    if not engine.head_w4:
        dense = isinstance(engine.lm_head.__dict__.get("weight"), torch.Tensor)
        return "fp32" if dense else "4-bit, as quantized in the model dir"
    return "4-bit value + 4-bit residual" + (f", top {top} re-scored from the fp rows" if top else "")


def answer(engine: Any, item: VqaItem, max_new_tokens: int) -> str:
    """The engine's greedy answer to one question, as ``chat`` produces it."""
    from lavin_edge.modality import IMAGE
    from lavin_edge.runtime.sampling import GenerationConfig

    engine.reset(IMAGE)
    visual = engine.encode_image(item.image)
    return engine.generate(item.prompt_ids, GenerationConfig(max_new_tokens=max_new_tokens), item.image_pos,
                           visual).text


def run_contender(c: Contender, segments: Sequence[list[int]], first: int, items: Sequence[VqaItem],
                  ref_fp: Reference | None, ref_q4: Reference | None, keep: Reference | None,
                  max_new_tokens: int, log: Callable[[str], None]) -> dict[str, Any]:
    """One row: load ``c``'s engine, read every segment and question, tally against the references; with
    ``keep``, store this contender's logits there (it is a reference for the later rows)."""
    from lavin_edge.evaluate import judge_open
    from lavin_edge.modality import IMAGE, TEXT
    from lavin_edge.runtime import Engine

    t0 = time.perf_counter()
    with kernel_backend(c.isa):
        eng = Engine.load(c.model_dir, backend=c.backend, kv_dtype=torch.float32 if c.reference else torch.float16)
    row: dict[str, Any] = {"contender": c.name, "model": str(c.model_dir),
                           "path": "prefill + decode steps" if c.decode else "prefill",
                           "lm_head": head_description(eng),
                           "native_decode": eng.native_decode is not None}
    text = Tally()
    for i, ids in enumerate(segments):
        logits = teacher_forced_logits(eng, ids, first + 1, TEXT, decode=c.decode)[first:-1].float()
        if keep is not None:
            keep.logits[i] = logits
        text.add(logits, torch.tensor(ids[first + 1:]), ref_fp, ref_q4, i)
    row.update(text.figures("text_", ref_fp is not None, ref_q4 is not None))
    if items and eng.vision is not None:
        vqa, hits = Tally(), 0
        for j, it in enumerate(items):
            start = len(it.prompt_ids) - 1
            visual = eng.encode_image(it.image)
            logits = teacher_forced_logits(eng, it.gold_ids, len(it.prompt_ids), IMAGE, it.image_pos, visual,
                                           c.decode)[start:-1].float()
            key = len(segments) + j
            if keep is not None:
                keep.logits[key] = logits
            vqa.add(logits, torch.tensor(it.gold_ids[start + 1:]), ref_fp, ref_q4, key)
            hits += judge_open(it.record, answer(eng, it, max_new_tokens))[1]
        row.update(vqa.figures("vqa_", ref_fp is not None, ref_q4 is not None))
        row["vqa_accuracy"] = hits / len(items)
        row["vqa_questions"] = len(items)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"{c.name}: {row['seconds']} s")
    return row


# ------------------------------------------------------------------------------------------------ driver

def default_dirs(model: str | None, fp_model: str | None) -> tuple[Path, Path | None]:
    """(quantized dir, merged fp dir or None): the given ones, else the demo's (built on first use). Without
    ``fp_model`` the quantized dir's recorded source (``source.quantized_from``) or a sibling ``merged/``."""
    from lavin_edge.demo.build import demo_model_dir
    from lavin_edge.demo.paths import MERGED_NAME

    q = Path(model) if model else demo_model_dir(quantized=True, build=True)
    if not (q / "config.json").is_file():
        raise QualityBenchError(f"--model {q}: not a model dir (no config.json)")
    if fp_model:
        fp = Path(fp_model)
        if not (fp / "config.json").is_file():
            raise QualityBenchError(f"--fp-model {fp}: not a model dir (no config.json)")
        return q, fp
    cfg = json.loads((q / "config.json").read_text())
    if "quantization_config" not in cfg:
        raise QualityBenchError(f"--model {q}: not a quantized model dir (run `lavin-edge quantize` first)")
    for cand in ((cfg.get("source") or {}).get("quantized_from"), q.parent / MERGED_NAME):
        if cand and (Path(cand) / "config.json").is_file():
            return q, Path(cand)
    return q, None


def parse_backends(spec: str | None, available: Sequence[str]) -> list[str]:
    """``avx512,avx2,...`` -> the engine backends to run (default: every one available here)."""
    if not spec:
        return [b for b in ENGINE_BACKENDS if b in available]
    out = []
    for b in (s.strip().lower() for s in spec.split(",") if s.strip()):
        if b not in ENGINE_BACKENDS:
            raise QualityBenchError(f"--backends: {b!r} is not one of {', '.join(ENGINE_BACKENDS)}")
        if b not in available:
            raise QualityBenchError(f"--backends: {b!r} is not available on this machine (available: "
                                    f"{', '.join(available)})")
        out.append(b)
    return out


def run_quality_bench(model: str | None = None, fp_model: str | None = None, backends: str | None = None,
                      vqa: int = DEFAULT_VQA, max_len: int = MAX_LEN, text: str | None = None,
                      max_new_tokens: int = 24, with_llamacpp: bool = True, json_out: bool = False,
                      print_results: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every row; returns ``{"model", "fp_model", "text_tokens", "vqa_questions", "rows": [...]}`` and
    prints a table (or the JSON with ``json_out``). Rows that cannot run carry ``skipped``."""
    from lavin_edge import kernels as K
    from lavin_edge.kernels.reference import act_format
    from lavin_edge.runtime import Engine

    if vqa < 0:
        raise QualityBenchError(f"--vqa must be >= 0, got {vqa}")
    if max_len < 8:
        raise QualityBenchError(f"--max-len must be >= 8, got {max_len}")
    try:
        fmt = act_format()
    except ValueError as e:
        raise QualityBenchError(str(e)) from None
    log = log or (lambda m: None)
    q_dir, fp_dir = default_dirs(model, fp_model)
    isas = parse_backends(backends, K.available_backends())
    probe = Engine.load(q_dir, backend="torch")
    tok = probe.tokenizer
    text = QUALITY_TEXT.read_text() if text is None else text
    segments = text_segments(tok, text, max_len)
    first = scored_from(tok)
    items = (vqa_items(tok, probe.n_visual, probe.cfg.vision.image_size, vqa)
             if vqa and probe.vision is not None else [])
    gguf = (json.loads((q_dir / "config.json").read_text()).get("tokenizer") or {}).get("gguf")
    del probe

    contenders: list[Contender] = []
    if fp_dir is not None:
        contenders.append(Contender("fp", fp_dir, "torch", decode=False, reference=True))
    contenders.append(Contender("4-bit exact", q_dir, "torch", decode=False, reference=True))
    # The torch kernel backend dequantizes every W4 weight on every call: one prefill per sequence keeps it
    # affordable, and its maths does not depend on how the positions are batched.
    contenders += [Contender(f"engine {b}", q_dir, "kernels", b, decode=b != "torch") for b in isas]

    ref_fp = Reference() if fp_dir is not None else None
    ref_q4 = Reference()
    rows = []
    for c in contenders:
        keep = ref_fp if c.name == "fp" else ref_q4 if c.name == "4-bit exact" else None
        fp_in = None if c.name == "fp" else ref_fp
        q4_in = None if c.name == "4-bit exact" else (ref_q4 if ref_q4.logits else None)
        rows.append(run_contender(c, segments, first, items, fp_in, q4_in, keep, max_new_tokens, log))
    if with_llamacpp:
        rows.append(llamacpp_perplexity_row(gguf, text, max_len))
    result = {"model": str(q_dir), "fp_model": str(fp_dir) if fp_dir else None,
              "text_tokens": sum(len(s) - first - 1 for s in segments), "text_segments": len(segments),
              "vqa_questions": len(items), "threads": torch.get_num_threads(), "w4_activations": fmt, "rows": rows,
              "cuda_engine": "not measured: no CUDA engine row yet"}
    if print_results:
        print(json.dumps(result) if json_out else format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    def f(v: Any, pct: bool = False, digits: int = 3) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.2f}%" if pct else f"{v:.{digits}f}"

    lines = [f"quality: {result['model']} (fp: {result['fp_model'] or '-'}); {result['text_tokens']} text tokens "
             f"in {result['text_segments']} segments, {result['vqa_questions']} easy-vqa test questions; W4 "
             f"activations {result['w4_activations']}",
             f"{'contender':<18} {'ppl':>8} {'top1 fp':>8} {'top1 q4':>8} {'max|dl|':>8} {'mean|dl|':>8} "
             f"{'vqa acc':>8} {'vqa q4':>8} {'vqa max':>8}"]
    for r in result["rows"]:
        if r.get("skipped"):
            lines.append(f"{r['contender'][:18]:<18} skipped: {r['skipped']}")
            continue
        lines.append(f"{r['contender'][:18]:<18} {f(r.get('text_ppl'), digits=2):>8} "
                     f"{f(r.get('text_top1_vs_fp'), True):>8} {f(r.get('text_top1_vs_q4'), True):>8} "
                     f"{f(r.get('text_max_logit_diff_vs_q4')):>8} "
                     f"{f(r.get('text_mean_logit_diff_vs_q4'), digits=4):>8} "
                     f"{f(r.get('vqa_accuracy'), True):>8} {f(r.get('vqa_top1_vs_q4'), True):>8} "
                     f"{f(r.get('vqa_max_logit_diff_vs_q4')):>8}")
    lines.append("top1: next-token argmax agreement at every scored position (text; vqa: along the gold "
                 "answers) with the fp / exact 4-bit model; |dl|: absolute logit difference from the exact "
                 "4-bit model. " + result["cuda_engine"] + ".")
    return "\n".join(lines)
