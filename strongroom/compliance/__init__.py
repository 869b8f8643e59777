"""Compliance: controls evaluated against the repository's evidence, and the reports.

* ``controls``: every control (id, description, framework references, check).
* ``evidence``: what the controls read (catalog, bucket settings, object heads,
  drill and verification records, WAL archive, audit chain, retention policy).
* ``evaluate``: runs the controls and builds a ``ComplianceReport`` (JSON).
* ``report_html``: the self-contained HTML report with inline SVG charts.
"""

from strongroom.compliance.evaluate import (
    ComplianceReport,
    ComplianceSettings,
    ControlsFailed,
    TargetPolicy,
    evaluate,
    write_report,
)

__all__ = [
    "ComplianceReport",
    "ComplianceSettings",
    "ControlsFailed",
    "TargetPolicy",
    "evaluate",
    "write_report",
]
