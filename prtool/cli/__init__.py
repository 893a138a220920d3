"""The `prtool` command line: one small file assembles the app, one file per command group; each command parses,
merges its recipe and makes one library call.

May import: anything in prtool.
Enforced by tests/test_architecture.py.
"""
