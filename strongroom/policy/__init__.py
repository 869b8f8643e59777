"""Policy: retention (what to keep, and why), object-lock-aware pruning, pins,
upload-time retain-until, and the sampling policy of deep verification.

* ``retention``: pure evaluation (``RetentionPolicy``, ``evaluate``,
  ``upload_retain_until``);
* ``prune``: applying it to a repository (``plan``, ``prune``, ``find_orphans``);
* ``locks``: reading S3 object locks and deleting only unlocked versions;
* ``pins``: ``pin`` / ``unpin`` / ``list_pins``;
* ``upload``: ``upload_settings`` for engines (retain-until of a new backup);
* ``wal``: PITR WAL retention;
* ``verification``: deep verify with a sampling policy and evidence records.
"""

from strongroom.policy.pins import list_pins, pin, unpin
from strongroom.policy.prune import RetentionReport, find_orphans, plan, prune
from strongroom.policy.retention import (
    BackupPoint,
    Decision,
    RetentionPolicy,
    evaluate,
    upload_retain_until,
)
from strongroom.policy.upload import retain_until_for_backup, upload_settings

__all__ = [
    "BackupPoint",
    "Decision",
    "RetentionPolicy",
    "RetentionReport",
    "evaluate",
    "find_orphans",
    "list_pins",
    "pin",
    "plan",
    "prune",
    "retain_until_for_backup",
    "unpin",
    "upload_retain_until",
    "upload_settings",
]
