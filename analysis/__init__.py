"""The report (``python -m analysis.report``; ``analysis.report.build_report(results, out,
train_paths=(), run_id=None) -> Path``): tables found and read through :mod:`store.catalog`, one
section per registered experiment (``analysis.sections``), charts (``analysis.figures``) and the
two renderings (``analysis.html``)."""
