"""Test support that ships with the package: fault-injection hooks (`faults`), off unless a test sets them."""
