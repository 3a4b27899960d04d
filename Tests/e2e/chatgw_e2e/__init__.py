"""Black-box end-to-end harness for chatgw.

Everything here talks to the real binary (``CHATGW_BIN``, default
``.build/debug/chatgw`` under the repo root) over loopback, through signals, ``ps``
and the master's stderr log. Nothing is written into the repository: every gateway
gets its own temporary state dir (holding its log as well) and runs with that dir as
its working directory.

Import each helper from its module (``from chatgw_e2e.ws import connect_hello``); this
file defines nothing. The pytest fixture ``make_gateway`` and the per-test hard timeout
are in ``Tests/e2e/conftest.py``, which also has pytest rewrite the asserts of this
package as it does a test module's.

* ``gateway`` -- ``Gateway``: one master process; see its docstring. Created by the
  ``make_gateway`` fixture, which also kills whatever is left at teardown.
  ``run_chatgw_once(...)``: run the binary to completion (start-up error tests).
  ``chatgw_bin()``, ``REPO_ROOT``, ``DEFAULT_CONFIG``, ``base_env``.
* ``procs`` -- process helpers: ``pid_alive``, ``ps_alive``, ``wait_pids_dead``,
  ``tagged_pids``, ``free_port``, ``cpu_seconds``, ``limit_files_to``.
* ``logs`` -- ``parse_log_line`` -> ``LogLine``.
* ``ws`` -- ``ws_connect``, ``connect_hello``, ``open_many``, ``close_all``,
  ``recv_json``, ``recv_until``, ``collect_until_close``, ``check_shutdown_bye``,
  ``ping_ok``, ``conn_slot`` -- asyncio WebSocket helpers on
  ``websockets.asyncio.client`` with a timeout on every step;
  ``join_room``, ``send_message``, ``send_json``, ``app_ping``, ``next_ref`` -- protocol
  helpers (docs/PROTOCOL.md); ``run_async(coro, timeout)`` -- ``asyncio.run`` with an
  overall timeout.
* ``raw`` -- frame level: ``ws_frame`` (masked frame writer), ``close_payload``,
  ``RawWS`` (raw-socket WebSocket client: handshake, frames, ``wait_close`` ->
  ``RawEnd``), ``upgrade_request``, ``raw_http`` -> ``HTTPReply``, the ``OP_*`` opcodes.
* ``placement`` -- ``connect_on_slot``, ``one_per_slot``, ``wait_bus_ready`` (a join
  succeeds on every worker slot), ``room_msgs``.
* ``rooms`` -- room traffic: ``Inbox`` (background reader of one connection: frames,
  counts per type, how it ended), ``wait_all``, ``read_frames``, ``send_many``,
  ``assert_quiet_until_pong``, ``check_consecutive``; one room, many senders:
  ``join_all_then_last``, ``send_numbered``, ``check_fanout``; ``first_lines`` for messages.
* ``ops`` -- ``chatctl``, the control socket, ``/metrics`` (test_operations.py).
* ``redis`` -- a real ``redis-server`` per test, a fake one, a RESP client; fixtures
  ``redis_server``, ``make_redis``, ``fake_redis`` (test_redis_bus.py).
* ``pg`` -- a throw-away PostgreSQL cluster; fixtures ``pg_cluster``, ``pg_db``
  (test_archive.py).
* ``browser`` -- headless Chromium on the built-in web page (test_browser.py,
  test_sse_browser.py) and on the master's status page (test_status.py).
* ``status`` -- the operator's view: ``BackgroundLoad`` (room traffic in a thread while a
  browser watches), ``master_get`` (the master's HTTP listener), the metric names in
  etc/grafana/chatgw.json and etc/prometheus/alerts.yml (test_status.py).
* ``sse`` -- Server-Sent Events through httpx: ``SSEStream`` (the /sse event stream,
  parsed as EventSource does), ``parse_id``, ``post_send``, ``get_history`` (test_sse.py).
* ``chaos`` -- resume under chaos: rooms under traffic while processes die, reload and
  stall, every acked message accounted for at every member (test_chaos.py, and
  ``scripts/chaos`` at full size).

The fixtures of ``redis`` and ``pg`` reach a test module by name: the module binds them
(``make_redis = redis.make_redis``).
"""
