from scanner.report.html import write_report  # noqa: F401
