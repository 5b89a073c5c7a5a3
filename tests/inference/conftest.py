from tests.inference.fixtures import bundle  # noqa: F401  (session fixture shared with tests/test_cli.py)
