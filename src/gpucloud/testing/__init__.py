"""Test helpers that start real services (PostgreSQL, the test bed) for tests and benchmarks."""
