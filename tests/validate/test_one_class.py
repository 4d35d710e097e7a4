"""A student that collapsed to one class is named in the run output and report (one_class_warning)."""
from dfkd_deploy.validate.gallery import ONE_CLASS_SHARE, one_class_warning


def _conf(matrix, names=None):
    return {"matrix": matrix, "rows": "teacher class", "columns": "student class", "class_names": names}


def test_a_student_giving_one_class_to_every_image_is_named():
    # teacher spreads 30 images over 3 classes; the student says class 2 for all of them
    line = one_class_warning(_conf([[0, 0, 10], [0, 0, 10], [0, 0, 10]], ["cat", "dog", "ship"]))
    assert line is not None
    assert "class 2 (ship)" in line and "100.0% of the 30 eval images" in line and "teacher for 33.3%" in line


def test_healthy_imbalanced_or_missing_matrices_give_no_warning():
    assert one_class_warning(_conf([[9, 1, 0], [1, 8, 1], [0, 2, 8]])) is None           # a working student
    assert one_class_warning(_conf([[95, 0], [0, 5]])) is None    # the teacher says the same: the data is so
    assert one_class_warning(_conf([[0, 0, 1], [0, 0, 1], [0, 0, 8]])) is None  # teacher 80%: not a collapse
    assert one_class_warning(None) is None and one_class_warning({"matrix": None, "reason": "too many"}) is None


def test_the_threshold_is_the_share_of_eval_images():
    def matrix(in_class_1: int):   # teacher: 90 images of class 0, 10 of class 1
        return [[100 - in_class_1, in_class_1 - 10], [0, 10]]

    just_under = round(100 * ONE_CLASS_SHARE) - 1
    assert one_class_warning(_conf(matrix(just_under))) is None
    assert one_class_warning(_conf(matrix(just_under + 1))) is not None


def test_a_run_puts_the_warning_in_report_json_and_report_md(tmp_path, monkeypatch, digits_teacher_onnx,
                                                             digits_eval_npz):
    import json

    from dfkd_deploy import run as api
    from tests.conftest import quick_recipe

    seen = []

    def fake(conf):
        seen.append(conf)
        return "the student predicts class 3 for 100.0% of the 540 eval images (stub)"

    monkeypatch.setattr(api, "one_class_warning", fake)
    out = tmp_path / "run"
    api.compress(digits_teacher_onnx, quick_recipe(), out, device="cpu", eval_data=digits_eval_npz,
                 show_progress=False)
    assert seen and seen[0]["matrix"] is not None            # the run's own confusion matrix was checked
    report = json.loads((out / "report.json").read_text())
    assert "class 3 for 100.0%" in report["student"]["warnings"][-1]
    assert "**Warning:** the student predicts class 3" in (out / "report.md").read_text()
