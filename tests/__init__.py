"""The test suite; a package so that tests.testbed is importable from fixtures and by hand."""
