"""Copies of backups, WAL and evidence to a second repository (3-2-1, off-site).

``engine.copy_repository`` streams and checks every object (``backups`` for backups,
``archive`` for WAL and evidence, ``stream`` for one object); ``records`` holds the
signed copy records that tell the catalog and the compliance audit which repositories
hold a copy of which backup. This package imports only the records eagerly (the
catalog's read commands list copies). See docs/copy.md.
"""

from strongroom.copying.records import CopyRecord, copies_by_backup, list_copies

__all__ = ["CopyRecord", "copies_by_backup", "list_copies"]
