"""The ``strongroom`` and ``strongroom-wal`` commands.

``strongroom.cli.app.app`` assembles the typer app from one module per command group;
``strongroom.cli.app.wal`` is the WAL hot path's entry point and imports none of them."""
