"""The ``prtool`` command line: one small file assembles the app, one file per command group."""
