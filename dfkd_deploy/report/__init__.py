"""Run outputs that describe the run: report.json / report.md and manifest.json."""
from dfkd_deploy.report.manifest import library_versions, verify_manifest, write_manifest
from dfkd_deploy.report.report import (REQUIRED_KEYS, build_report, count_parameters, get_path, missing_keys,
                     render_report_md, write_report_json, write_report_md)

__all__ = ["REQUIRED_KEYS", "build_report", "count_parameters", "get_path", "library_versions",
           "missing_keys", "render_report_md", "verify_manifest", "write_manifest",
           "write_report_json", "write_report_md"]
