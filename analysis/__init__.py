"""Analysis of the result tables: readers (``analysis.tables``), figures (``analysis.figures``),
rendering (``analysis.html``) and the report (``python -m analysis.report``;
``analysis.report.build_report(results, out, train_paths=(), run_id=None) -> Path``)."""
