"""Time the demo's GPTQ on its first N layers (the whole build's cost scales with the layer count): wall and
this process's CPU seconds, so that two versions can be compared side by side on a busy machine.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/time_demo_quantize.py DEMO_DIR/merged --layers 3
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("merged")
    ap.add_argument("--layers", type=int, default=3)
    a = ap.parse_args()
    from lavin_edge.demo import paths as demo_build
    from lavin_edge.merge import load_merged
    from lavin_edge.modeldir import load_tokenizer_of
    from lavin_edge.quantize.pipeline import GPTQConfig, quantize_model
    from lavin_edge.quantize.run import QuantizeOptions, calibration_samples

    model, mcfg = load_merged(a.merged)
    model.llm.layers = model.llm.layers[:a.layers]
    calib = json.loads((demo_build.ADAPTERS_DIR / "config.json").read_text())["recipe"]["data"]
    opts = QuantizeOptions(**demo_build.QUANTIZE_OPTIONS, calib_data=calib)
    samples = calibration_samples(opts, load_tokenizer_of(a.merged, mcfg), model.n_visual,
                                  model.cfg.vision.image_size)
    qcfg = GPTQConfig(group_size=opts.group_size, sym=opts.sym, asym_calib=opts.asym_calib)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    _, report = quantize_model(model, samples, qcfg, progress=False)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"layers": a.layers, "threads": torch.get_num_threads(), "wall_s": round(time.time() - t0, 2),
                      "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2),
                      "gptq_error": sum(r.gptq_error for r in report.linears),
                      "rtn_error": sum(r.rtn_error for r in report.linears)}))


if __name__ == "__main__":
    main()
