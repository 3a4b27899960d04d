"""scripts/bench --repeat N: issue 18's bar over N rounds (scripts/bench_bar.py), without a run.

Each line is judged on the median over the rounds of that round's ratio chatgw/nchan, says
the median, every round's ratio and the medians of the two figures; line 1's "0 failed" holds
in every round; one round's bar is lean_bar's, unchanged.
"""

from __future__ import annotations

import glob
import json
import math
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import bench_bar  # noqa: E402


def connect(handshakes_per_s, server_us, failed=0):
    return {"connect": {"handshakes_per_s": handshakes_per_s, "failed": failed,
                        "server_cpu_us_per_handshake": server_us}}


def combined(rounds):
    """combine_rounds over [(ours, nchan's)] a round: {line number: (verdict, text)}."""
    lines = [bench_bar.lean_bar_lines(ours, peer, "nchan") for ours, peer in rounds]
    return {t.split(".")[0]: (v, t) for v, t in bench_bar.combine_rounds(lines) if t[:1].isdigit()}


def test_median_of_the_rounds_ratios_decides_not_one_round():
    # Line 1 (>= 1.2x): 1.10x, 1.30x, 1.25x -> median 1.25x: PASS, though round 1 fails.
    # Line 2 (<= 0.75x): 0.50x, 1.00x, 0.70x -> median 0.70x: PASS, though round 2 fails.
    bar = combined([(connect(110, 10), connect(100, 20)),
                    (connect(130, 20), connect(100, 20)),
                    (connect(125, 14), connect(100, 20))])
    assert bar["1"] == ("PASS", "1. handshakes/s >= 1.2x nchan, 0 failed: median 125 vs 100 = median 1.25x "
                                "of 1.10x 1.30x 1.25x, 0 failed in every round")
    assert bar["2"] == ("PASS", "2. server CPU per handshake <= 0.75x nchan: median 14 µs vs 20 µs = median 0.70x "
                                "of 0.50x 1.00x 0.70x")


def test_an_even_count_takes_the_mean_of_the_two_middle_ratios():
    # 1.10x and 1.40x: median 1.25x >= 1.2x; 0.50x and 1.00x: median 0.75x <= 0.75x.
    bar = combined([(connect(110, 10), connect(100, 20)), (connect(140, 20), connect(100, 20))])
    assert bar["1"][0] == "PASS" and "median 1.25x of 1.10x 1.40x" in bar["1"][1]
    assert bar["1"][1].startswith("1. handshakes/s >= 1.2x nchan, 0 failed: median 125 vs 100 = ")
    assert bar["2"][0] == "PASS" and "median 0.75x of 0.50x 1.00x" in bar["2"][1]
    # 1.10x and 1.20x: median 1.15x < 1.2x.
    bar = combined([(connect(110, 10), connect(100, 20)), (connect(120, 10), connect(100, 20))])
    assert bar["1"][0] == "FAIL" and "median 1.15x of 1.10x 1.20x" in bar["1"][1]
    assert bench_bar.median([1.0, 2.0, 10.0, 4.0]) == 3.0


def test_line_1_fails_when_any_round_failed_a_handshake():
    bar = combined([(connect(150, 10), connect(100, 20)),
                    (connect(150, 10, failed=3), connect(100, 20)),
                    (connect(150, 10), connect(100, 20))])
    assert bar["1"][0] == "FAIL"
    assert bar["1"][1].endswith("median 1.50x of 1.50x 1.50x 1.50x, failed 0 3 0")


def test_a_round_that_did_not_run_counts_for_nothing_and_is_named():
    bar = combined([(connect(150, 10), connect(100, 20)), ({}, connect(100, 20))])
    assert bar["1"] == ("PASS", "1. handshakes/s >= 1.2x nchan, 0 failed: median 150 vs 100 = median 1.50x "
                                "of 1.50x -, 0 failed in every round (1 of 2 rounds ran)")
    bar = combined([({}, {}), ({}, {})])
    assert bar["1"][0] == "-" and "not run" in bar["1"][1]


def fanout(*steps):
    """fanout-18k-100rooms with steps (rate, passed, deliveries/s, server µs/delivery)."""
    return {"fanout-18k-100rooms": {"steps": [
        {"rate_msgs_per_s": r, "pass": p, "deliveries_per_s": d, "server_cpu_us_per_delivery": us}
        for r, p, d, us in steps]}}


def test_line_5b_is_per_round_and_a_round_with_no_common_rate_fails_it():
    ours = fanout((100, True, 18000, 5.0), (200, True, 36000, 6.0))
    bar_lines = [bench_bar.lean_bar_lines(ours, fanout((100, True, 18000, 10.0), (200, True, 36000, 10.0)), "nchan"),
                 bench_bar.lean_bar_lines(ours, fanout((100, True, 18000, 10.0), (200, False, 30000, 10.0)), "nchan"),
                 bench_bar.lean_bar_lines(fanout((100, False, 1000, 5.0)), fanout((100, True, 18000, 10.0)), "nchan")]
    out = bench_bar.combine_rounds(bar_lines)
    b = next((v, t) for v, t in out if t.strip().startswith("(b)"))
    # 0.60x (200 msg/s), 0.50x (100 msg/s), none (chatgw passed nothing): median 0.60x <= 0.7x.
    assert b == ("PASS", "    (b) 100 rooms at the highest rate both passed, 200 100 none msg/s: "
                         "median 5.50 µs vs 10.00 µs = median 0.60x of 0.60x 0.50x none")
    two_failing = bench_bar.combine_rounds([bar_lines[0], bar_lines[2], bar_lines[2]])
    assert next(v for v, t in two_failing if t.strip().startswith("(b)")) == "FAIL"
    # Line 6 from each round's best passing step: 36,000/36,000, 36,000/18,000, 0/18,000.
    six = next((v, t) for v, t in out if t.startswith("6."))
    assert six[0] == "FAIL" and six[1].endswith("median 1.00x of 1.00x 2.00x 0.00x")


def one_room(server_us, server_sys_us):
    return {"fanout-18k-1room": {"params": {"members": 18000}, "steps": [
        {"latency": {"p99_ms": 100}, "server_cpu_us_per_delivery": server_us, "server_sys_us_per_delivery": server_sys_us}]}}


def test_the_kernel_floor_is_shown_under_its_line_and_never_judged():
    # chatgw's kernel time alone (7.5 µs) is past 0.7x nchan's whole (10 µs): the floor says
    # 0.75x, and line 5 fails on its own figures (9 against 10 µs = 0.90x), not on the floor.
    lines = bench_bar.lean_bar(one_room(9.0, 7.5), one_room(10.0, 7.0), "nchan")
    floor = next((v, t) for v, t in lines if "(floor) one room" in t)
    assert floor == ("info", "    (floor) one room of 18,000, 2 msg/s: chatgw's kernel time alone per delivery "
                             "against nchan's whole: 7.50 µs vs 10.00 µs = 0.75x")
    one = next((v, t) for v, t in lines if t.strip().startswith("one room"))
    assert one[0] == "FAIL" and one[1].endswith("9.00 µs vs 10.00 µs = 0.90x")
    # A line whose own figures pass stays passed whatever its floor says.
    passing = bench_bar.lean_bar(one_room(6.0, 5.9), one_room(10.0, 7.0), "nchan")
    assert next(v for v, t in passing if t.strip().startswith("one room")) == "PASS"
    # Over rounds: the median of the rounds' floors, still shown only.
    rounds = [bench_bar.lean_bar_lines(one_room(9.0, k), one_room(10.0, 7.0), "nchan") for k in (6.0, 7.5, 8.0)]
    out = bench_bar.combine_rounds(rounds)
    assert next((v, t) for v, t in out if "(floor) one room" in t) == (
        "info", "    (floor) one room of 18,000, 2 msg/s: chatgw's kernel time alone per delivery against nchan's whole: "
                "median 7.50 µs vs 10.00 µs = median 0.75x of 0.60x 0.75x 0.80x")


def test_round_view_takes_name_at_k_for_the_repeated_and_the_rest_once():
    run = {"connect": {"r": 1}, "connect@2": {"r": 2}, "idle": {"r": 1}, "c100k": {"once": True},
           "hotroom": {"once": True}, "idle@3": {"r": 3}}
    assert bench_bar.round_view(run, 1) == {"connect": {"r": 1}, "idle": {"r": 1}, "c100k": {"once": True}, "hotroom": {"once": True}}
    assert bench_bar.round_view(run, 2) == {"connect": {"r": 2}, "c100k": {"once": True}, "hotroom": {"once": True}}
    assert bench_bar.round_view(run, 3) == {"idle": {"r": 3}, "c100k": {"once": True}, "hotroom": {"once": True}}


def test_kept_runs_one_round_and_identical_rounds_judge_as_lean_bar():
    runs = [json.load(open(p)) for p in sorted(glob.glob(str(REPO_ROOT / "bench" / "results" / "*.json")))]
    runs = [r for r in runs if "peer" in r and "scenarios" in r]
    assert runs
    for r in runs:
        ours, peer = r["scenarios"], r["peer"]["scenarios"]
        one = bench_bar.lean_bar(ours, peer, "nchan")
        lines = bench_bar.lean_bar_lines(ours, peer, "nchan")
        assert [(v, t) for v, t, _ in lines] == one
        if "lean_bar" in r:  # written by scripts/bench of its day: the same bar
            rounds = r.get("repeat", 1)
            stored = one
            if rounds > 1:  # --repeat N: the rounds' bars combined
                stored = bench_bar.combine_rounds([
                    bench_bar.lean_bar_lines(bench_bar.round_view(ours, k), bench_bar.round_view(peer, k), "nchan")
                    for k in range(1, rounds + 1)])
            if not any("(floor)" in x["check"] for x in r["lean_bar"]):  # written before the floors were shown
                stored = [(v, t) for v, t in stored if "(floor)" not in t]
            assert [(x["verdict"], x["check"]) for x in r["lean_bar"]] == stored
        for n in (1, 2, 3):
            assert [v for v, _ in bench_bar.combine_rounds([lines] * n)] == [v for v, _ in one]
        assert all(math.isfinite(f["value"]) or f["value"] == math.inf for _, _, f in lines if f.get("value") is not None)


def test_bad_options_are_refused_before_anything_runs():
    """An option without its value, or with one it cannot take, exits 2 with a line that
    names it (an option given last without its value used to exit 1 without a word)."""
    for args, says in [(["--peer"], "--peer needs a value"), (["--only"], "--only needs a value"),
                       (["--repeat"], "--repeat needs a value"), (["--repeat", "0"], "--repeat 0: needs a whole number"),
                       (["--peer", "foo"], "only nchan is known"), (["--only", "nope"], "--only nope: not a scenario"),
                       (["--repeat", "2"], "--repeat 2 needs --peer nchan"), (["--what"], "unknown argument: --what")]:
        r = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "bench"), *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and says in r.stderr, (args, r.returncode, r.stderr)


def test_line_3_judges_the_joins_of_connects_size_and_still_reads_older_results():
    # connect-join and connect-join-url (as large as connect's run) are line 3's two ways;
    # a result without connect-join (before 2026-12-05's change) judges idle's join, as then.
    peer = connect(100, 20)
    ours = dict(connect(100, 10), idle={"setups_per_s": 50},
                **{"connect-join": {"setups_per_s": 70}, "connect-join-url": {"setups_per_s": 105}})
    lines = [t for _, t in bench_bar.lean_bar(ours, peer, "nchan")]
    assert "    connect-join (connect, hello, join): 70 vs 100 = 0.70x" in lines
    assert "    connect-join-url (the room in the URL): 105 vs 100 = 1.05x" in lines
    assert not any(t.startswith("    idle (connect, hello, join)") for t in lines)
    verdicts = {t: v for v, t in bench_bar.lean_bar(ours, peer, "nchan")}
    assert verdicts["3. connect + join per second >= 1.0x nchan's handshakes/s, either way of joining"] == "PASS"

    older = dict(connect(100, 10), idle={"setups_per_s": 50}, **{"connect-join-url": {"setups_per_s": 90}})
    lines = [t for _, t in bench_bar.lean_bar(older, peer, "nchan")]
    assert "    idle (connect, hello, join): 50 vs 100 = 0.50x" in lines
    assert {t: v for v, t in bench_bar.lean_bar(older, peer, "nchan")}[
        "3. connect + join per second >= 1.0x nchan's handshakes/s, either way of joining"] == "FAIL"
