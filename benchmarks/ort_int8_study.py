"""Why ORT QDQ int8 is slower than fp32 on this CPU: quantization variants (QDQ/QOperator, S8S8/U8S8,
per-tensor/per-channel, reduce_range) x graph optimisation level x intra-op threads, timed side by side
in one process in alternating rounds; ops left after optimisation counted. Usage:
    python benchmarks/ort_int8_study.py [cifar_resnet20] [benchmarks/results/ort_int8_study.json]
"""
import json, os, sys, tempfile, time
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort, torch
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static, CalibrationMethod
sys.path.insert(0, os.getcwd())
from dfkd_deploy import build_model
from exporters.onnx_export import export_student_onnx
from exporters.ort_quant import calibration_reader, _preprocess

def load():
    return os.getloadavg()

def variants():
    V = {}
    for fmt in ("QDQ", "QOperator"):
        for act, sym in (("S8", True), ("U8", False)):
            for pc in (True, False):
                V[f"{fmt} {act}S8 {'per-channel' if pc else 'per-tensor'}"] = dict(fmt=fmt, act=act, sym=sym, pc=pc, rr=False)
    V["QDQ U8S8 per-channel reduce_range"] = dict(fmt="QDQ", act="U8", sym=False, pc=True, rr=True)
    return V

def quant(src, dst, calib, v):
    quantize_static(str(src), str(dst), calibration_reader(calib),
        quant_format=QuantFormat.QDQ if v["fmt"] == "QDQ" else QuantFormat.QOperator,
        per_channel=v["pc"], reduce_range=v["rr"],
        activation_type=QuantType.QInt8 if v["act"] == "S8" else QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": v["sym"], "WeightSymmetric": True})

def session(path, level, threads, optimized=None):
    o = ort.SessionOptions(); o.log_severity_level = 3
    o.graph_optimization_level = level; o.intra_op_num_threads = threads
    if optimized: o.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

def float_ops(optimized):
    g = onnx.load(str(optimized)).graph
    ops = {}
    for n in g.node: ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops

def median_ms(sess, x, repeats):
    name = sess.get_inputs()[0].name
    for _ in range(3): sess.run(None, {name: x})
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter(); sess.run(None, {name: x}); t.append(time.perf_counter() - t0)
    return 1000 * float(np.median(t))

def main(model_name="cifar_resnet20", rounds=3, repeats=10, out=None):
    torch.manual_seed(0)
    m = build_model(model_name, num_classes=10).eval()
    work = Path(tempfile.mkdtemp(prefix="ortstudy-"))
    fp32 = export_student_onnx(m, work / "fp32.onnx", input_shape=(3, 32, 32)).path
    pre = _preprocess(fp32, work / "pre.onnx", [])
    calib = np.random.default_rng(0).standard_normal((64, 3, 32, 32), dtype=np.float32)
    files = {"fp32": fp32}
    for k, v in variants().items():
        dst = work / (k.replace(" ", "_") + ".onnx"); quant(pre, dst, calib, v); files[k] = dst
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    configs = [(k, lv, 1) for k in files for lv in ("all", "basic")]
    configs += [(k, "all", 2) for k in ("fp32", "QDQ S8S8 per-channel", "QOperator U8S8 per-channel")]
    sess, ops = {}, {}
    for k, lv, th in configs:
        optp = work / f"opt_{abs(hash((k, lv)))}.onnx"
        sess[(k, lv, th)] = session(files[k], levels[lv], th, optp if th == 1 else None)
        print("session", k, lv, th, flush=True)
        if th == 1: ops[(k, lv)] = float_ops(optp)
    xs = {b: np.random.default_rng(b).standard_normal((b, 3, 32, 32), dtype=np.float32) for b in (1, 32)}
    res = {c: {1: [], 32: []} for c in configs}
    load0 = load()
    for r in range(rounds):
        print("round", r, os.getloadavg(), flush=True)
        for c in (configs if r % 2 == 0 else configs[::-1]):
            for b, x in xs.items():
                res[c][b].append(median_ms(sess[c], x, repeats))
    load1 = load()
    rows = []
    for (k, lv, th) in configs:
        rows.append({"variant": k, "opt_level": lv, "threads": th,
                     "batch_1_ms": round(float(np.median(res[(k, lv, th)][1])), 4),
                     "batch_32_ms": round(float(np.median(res[(k, lv, th)][32])), 4),
                     "bytes": files[k].stat().st_size,
                     "ops_after_optimisation": ops[(k, lv)]})
    report = {"model": model_name, "weights": "random (torch.manual_seed(0))", "rounds": rounds, "repeats": repeats,
              "order": "alternating (forward, then reversed) over all configs per round; median of round medians",
              "loadavg_start": load0, "loadavg_end": load1, "cpu_count": os.cpu_count(),
              "onnxruntime": ort.__version__, "rows": rows}
    if out: Path(out).write_text(json.dumps(report, indent=1))
    return report

if __name__ == "__main__":
    rep = main(sys.argv[1] if len(sys.argv) > 1 else "cifar_resnet20", out=sys.argv[2] if len(sys.argv) > 2 else None)
    print("load", rep["loadavg_start"], rep["loadavg_end"])
    for r in rep["rows"]:
        o = r["ops_after_optimisation"]
        print(f"{r['variant']:40s} {r['opt_level']:8s} t{r['threads']} b1 {r['batch_1_ms']:7.3f} b32 {r['batch_32_ms']:8.3f}  ", {k: v for k, v in o.items() if k not in ("Constant",)})
