"""Operator-side code that never ships to Lambda: the CLI, the demo, the sandbox, the emulator.

The Lambda artifact is built without this folder (functions/Makefile), and no module outside it
imports from it (tests/unit/test_layout.py reads the imports to make sure).
"""
