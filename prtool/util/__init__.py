"""Helpers every layer uses: progress bars, seeding, statistics, timing, devices, atomic files and reports,
recipes.

May import: prtool.errors only.
Enforced by tests/test_architecture.py.
"""
