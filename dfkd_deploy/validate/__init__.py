"""Validation on real labelled data: loading it at the teacher's shape, and the metrics."""
from dfkd_deploy.validate.data import EvalData, load_eval_data, to_pixels
from dfkd_deploy.validate.metrics import evaluate, predict, top1_accuracy, top1_agreement

__all__ = ["EvalData", "evaluate", "load_eval_data", "predict", "to_pixels", "top1_accuracy",
           "top1_agreement"]
