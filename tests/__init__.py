"""The test suite, laid out as the package: ``tests/<folder>`` tests ``fastunlearn/<folder>`` (``tests/ops`` the
ops, ``tests/engine`` the engine, ...), ``tests/test_<module>.py`` a top-level module (``test_losses.py``,
``test_models.py``), and ``test_structure.py``, ``test_install.py``, ``test_readme.py`` the package as a whole.
What several test files share lives in ``tests/helpers`` (plain modules) and ``tests/conftest.py`` (fixtures);
a test file never imports another test file (``test_structure.py`` checks both rules)."""
