"""`pipeline report RUN_DIR`: one self-contained report.html (images embedded as data URIs) explaining a run."""

from pipeline.commands.report.report import SECTIONS, build_report, write_report

__all__ = ["SECTIONS", "build_report", "write_report"]
