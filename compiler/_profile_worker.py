"""Profiles one ONNX file in a fresh process (run by ``tierserve_compiler.profile``).

Usage: python _profile_worker.py SPEC.json  ->  prints one JSON object on stdout.
Imports only numpy and onnxruntime so the numbers reflect what a serving process pays.
"""

import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    """This process's RSS high-water mark. VmHWM belongs to the current address space, while
    ru_maxrss survives fork+exec and would report the (possibly torch-sized) parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.loads(fh.read())
    import numpy as np
    import onnxruntime as ort

    with np.load(spec["data"], allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    base_rss_mb = peak_rss_mb()
    result: dict = {"baseline_rss_mb": base_rss_mb, "threads": {}}
    for i, threads in enumerate(spec["threads"]):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        t0 = time.perf_counter()
        sess = ort.InferenceSession(spec["model"], so, providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - t0
        per_batch = {}
        for b in spec["batch_sizes"]:
            feed = {k: v[:b] for k, v in data.items()}
            for _ in range(spec["warmup"]):
                sess.run(None, feed)
            times = []
            for _ in range(spec["iterations"]):
                t = time.perf_counter()
                sess.run(None, feed)
                times.append((time.perf_counter() - t) * 1000)
            per_batch[str(b)] = {
                "p50_ms": float(np.percentile(times, 50)),
                "p95_ms": float(np.percentile(times, 95)),
                "mean_ms": float(np.mean(times)),
            }
        result["threads"][str(threads)] = {"load_s": load_s, "batches": per_batch}
        if i == 0:
            result["load_s"] = load_s
            result["peak_rss_mb"] = peak_rss_mb()
        del sess
    print(json.dumps(result))


if __name__ == "__main__":
    main()
