"""Verification: metrics, parity runs, the one pass/fail judge, reports and golden bundles."""
