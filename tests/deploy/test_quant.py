import numpy as np
import onnx

from dfkd_deploy.synthesis.pool import ImagePool
from dfkd_deploy.runtime.onnxruntime import OrtRunner
from dfkd_deploy.images import uint8_to_model
from exporters.ort_quant import qdq_node_count, quantize_student, sample_calibration


def test_run_writes_int8_with_agreement(deploy_run):
    int8 = deploy_run.report["int8"]
    assert (deploy_run.run_dir / "student.int8.onnx").is_file()
    assert int8["format"] == "QDQ" and int8["qdq_nodes"] > 0
    assert 0.0 <= int8["top1_agreement_vs_fp32"] <= 1.0 and int8["probe_images"] > 0
    assert int8["accuracy"] is not None          # eval data was given


def test_quantize_student_valid_qdq(deploy_run, tmp_path):
    run = deploy_run.run_dir
    calib = sample_calibration(ImagePool(run / "pool"), count=64, seed=1)
    assert calib.dtype == np.uint8 and len(calib) == 64
    x = uint8_to_model(calib, None, None, 1.0)
    res = quantize_student(run / "student.onnx", tmp_path / "s.int8.onnx", x[:48], probes=x[48:])
    onnx.checker.check_model(str(res.path))
    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and res.qdq_nodes == qdq_node_count(res.path)
    assert res.probe_images == 16 and res.top1_agreement_vs_fp32 is not None
    # symmetric int8 (TensorRT-compatible): every zero point is 0
    init = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(res.path)).graph.initializer}
    zps = [v for k, v in init.items() if k.endswith("zero_point")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    # dynamic batch survives quantization
    assert OrtRunner(res.path).predict(np.asarray(x[:3])).shape == (3, 10)

