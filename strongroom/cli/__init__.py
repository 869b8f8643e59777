"""The ``strongroom`` and ``strongroom-wal`` commands.

``strongroom.cli.app`` assembles the typer app from one module per command group, each
importing only ``strongroom.cli.common``; ``strongroom.cli.wal`` is the WAL hot path's
entry point and imports none of them.
"""
