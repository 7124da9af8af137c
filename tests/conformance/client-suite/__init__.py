"""The hypha-rpc client's own test suite, run against hypha-rtc.

The test files come unchanged from the hypha-rpc source distribution on PyPI; this package adds
what the distribution leaves out: the server addresses the tests import, and (in conftest.py) the
fixtures that start hypha-rtc.
"""

import os

WS_PORT = int(os.environ.get("CLIENT_SUITE_PORT", "38283"))
# The published tests build service URLs (`{WS_SERVER_URL}/public/services/...`) from it, so
# it is the server's HTTP base; the client finds `/ws` itself.
WS_SERVER_URL = f"http://127.0.0.1:{WS_PORT}"
