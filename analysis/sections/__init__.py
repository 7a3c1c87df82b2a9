"""The report's sections, one module each. An experiment's ``REPORT`` names one of them:
``Summary(...)`` is drawn by :mod:`analysis.sections.summary`, ``CustomSection("<module>")`` by
``analysis.sections.<module>.section(builder)`` (a :class:`analysis.html.Section` or a list)."""
