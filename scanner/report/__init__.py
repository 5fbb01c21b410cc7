"""report.html from a finished scan's outputs: load.py (the inputs, leniently), plots.py, markup.py (HTML pieces),
sections.py / samples.py / rules.py (the sections), page.py (the page). `memscan report` is its command."""

from scanner.report.page import write_report

__all__ = ["write_report"]
