"""Tests of the client suite that do not run against hypha-rtc, each with its reason.

EXCLUDED: they need infrastructure hypha-rtc does not claim (skipped).
GAPS: what hypha-rtc has not built yet (reported as expected failures without being run, since
most of them would only wait for their time-out; remove an entry when its gap is built).
Keys are `file.py` (the whole file) or `file.py::test_name`.
"""

EXCLUDED = {
    "test_server_compatibility.py": "talks to the public Hypha server at hypha.aicell.io (no network in the test run)",
    "test_utils.py::test_launch_external_services": "launches tests/example_service_script.py, which the source distribution does not ship",
    # A race inside the client: connect_to_server returns before the client's own
    # subscribe(["client_disconnected"]) call is answered; the test disconnects at once, the
    # cleanup removes the handler and sets it to None (hypha_rpc/rpc.py, _cleanup_on_disconnect),
    # then the answer arrives and the subscription code registers that None as the handler
    # (rpc.py, `self.on("client_disconnected", self._bound_handle_client_disconnected)`).
    # Evidence: the assertion prints `{'client_disconnected': [None]}`, a handler no server
    # can put there; the outcome depends on whether the answer beats the close.
    "test_memory_gc_validation.py::TestIntegrationGC::test_client_collected_after_disconnect": "client race: a None handler registered after disconnect (see above)",
    "test_memory_gc_validation.py::TestMemoryGrowth::test_repeated_connections_no_growth": "client race: a None handler registered after disconnect (see above)",
    # Timing inside the client: the test restarts the server three times 2.3 s apart and gives
    # the client a fixed `asyncio.sleep(2)` to reconnect, but the client's flap control
    # (websocket_client.py: a connection younger than RECONNECT_FLAP_WINDOW = 5 s is a flap,
    # and flaps wait at least RECONNECT_MIN_DELAY = 1 s, doubling) can put its next attempt
    # past those 2 s. Evidence: it passed in one full run and failed in the next with
    # "ConnectionError: Client disconnected: */manager-..." at the get_service after a restart.
    "test_websocket_rpc.py::test_persistent_service_across_multiple_restarts": "client timing: a fixed 2 s sleep against the client's own reconnect back-off (see above)",
}

# Every gap found by the suite is built; new ones go here, each with what is missing.
GAPS: dict[str, str] = {}
