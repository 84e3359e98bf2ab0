"Shared pytest configuration."


def pytest_configure(config):
    # scripts/test.sh runs the tests marked `exact` a second time on another CPU kernel path (one thread, no SIMD
    # dispatch), so that an equality that holds only on one code path fails in CI rather than on a user's machine.
    config.addinivalue_line("markers", "exact: asserts bit-exact equality; the test's docstring says why it is exact")
