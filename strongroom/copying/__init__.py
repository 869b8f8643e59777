"""Copies of backups, WAL and evidence to a second repository (3-2-1, off-site).

``copy_repository`` (``engine``) streams and checks every object; ``records`` holds
the signed copy records that tell the catalog and the compliance audit which
repositories hold a copy of which backup. See docs/copy.md.
"""

from strongroom.copying.engine import CopyOptions, copy_repository, parse_since
from strongroom.copying.records import CopyRecord, copies_by_backup, list_copies
from strongroom.copying.report import CopyReport

__all__ = [
    "CopyOptions",
    "CopyRecord",
    "CopyReport",
    "copies_by_backup",
    "copy_repository",
    "list_copies",
    "parse_since",
]
