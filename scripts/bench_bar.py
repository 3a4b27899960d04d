"""Issue 18's bar (the lean worker) for scripts/bench: lean_bar judges chatgw's scenarios
against the peer's (nginx+nchan) from one run's chatbench JSON, a line of the bar each;
with --repeat N, lean_bar_lines judges each round and combine_rounds judges each line on the
median over the rounds of that round's ratio chatgw/peer.

scripts/bench's report (the python in scripts/bench) imports it; Tests/e2e/test_bench_rounds.py
tests it without a run.
"""

import math
import statistics

# The scenarios judged by lean_bar that --repeat N runs N times (against both servers, but
# connect-join and connect-join-url, chatgw's alone); round k > 1 keeps them as NAME@k.
REPEATED = ("connect", "idle", "connect-join", "connect-join-url", "fanout-18k-100rooms", "fanout-18k-1room")


def round_view(scenarios, k, repeated=REPEATED):
    """The scenarios of round k (1-based) from a run's scenarios (NAME and NAME@k keys): the
    ones that ran once as they are, a repeated NAME from NAME@k (absent if round k has none)."""
    view = {name: v for name, v in scenarios.items() if "@" not in name}
    if k > 1:
        for name in repeated:
            view.pop(name, None)
            if f"{name}@{k}" in scenarios:
                view[name] = scenarios[f"{name}@{k}"]
    return view


def g(d, *keys):
    for k in keys:
        if isinstance(d, dict) and k in d: d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d): d = d[k]
        else: return None
    return d

def best_step(sc):
    """Line 2's best passing step of fanout-18k-100rooms in scenarios sc (most deliveries/s), or {}."""
    passing = [st for st in (g(sc, "fanout-18k-100rooms", "steps") or []) if st.get("pass")]
    return max(passing, key=lambda st: st["deliveries_per_s"]) if passing else {}

def fmt(v):
    """A table cell: '-' for nothing, text as it is, 2 decimals below 100, else a whole number."""
    if v is None: return "-"
    if isinstance(v, str): return v
    if isinstance(v, float) and abs(v) < 100: return f"{v:,.2f}"
    return f"{round(v):,}"

# Issue 18's bar (the lean worker), judged from chatgw's scenarios against the peer's in the
# same run (C100K and the load generator's share from chatgw's alone).
C100K, C100K_KB = 100_000, 2.0
def lean_bar(ours, peer_scenarios, peer):
    """[(verdict, text)], a line of the bar each, with its measured values, ratio and threshold.
    PASS or FAIL; '-' where a figure is missing (the scenario did not run: the text says which);
    'info' for what is shown and not judged. A line made of several checks (3, 5, 9) is a
    heading with its verdict, then its checks indented under it."""
    return [(v, t) for v, t, _ in lean_bar_lines(ours, peer_scenarios, peer)]


def lean_bar_lines(ours, peer_scenarios, peer):
    """lean_bar's lines as (verdict, text, figures): figures is a dict with the line's "key"
    (its number: "1", "3.idle", "5.b", ...) and "kind": "check" (a ratio against a threshold,
    with "rule", "unit", "limit", "higher", "a", "b", "ratio" and "value", the ratio as judged:
    None where not run, inf or 0 where the ratio is none but the verdict is FAIL or PASS),
    "heading" (with "combine", "all" or "any", and "subs", its checks' keys) or "plain"."""
    def check(key, rule, a, b, limit, higher, sources, unit="", at=("", "")):
        """rule: the line as the bar says it; a / b (chatgw's / the other figure) >= or <=
        limit; sources: where a and b come from, named when missing; at: notes after each."""
        fig = {"key": key, "kind": "check", "rule": rule, "unit": unit, "limit": limit, "higher": higher,
               "a": a, "b": b, "ratio": None, "value": None}
        gone = list(dict.fromkeys(src for src, v in zip(sources, (a, b)) if v is None))
        if gone:
            return "-", f"{rule}: not run (no {' and no '.join(gone)})", fig
        ratio = a / b if b else None
        ok = (ratio >= limit if higher else ratio <= limit) if ratio is not None else higher and a > 0
        fig.update(ratio=ratio, value=ratio if ratio is not None else math.inf if ok or not higher else 0.0)
        return ("PASS" if ok else "FAIL",
                f"{rule}: {fmt(a)}{unit}{at[0]} vs {fmt(b)}{unit}{at[1]} = " + ("-" if ratio is None else f"{ratio:.2f}x"), fig)
    def all_of(verdicts):
        return "FAIL" if "FAIL" in verdicts else "-" if "-" in verdicts else "PASS"
    def any_of(verdicts):
        return "PASS" if "PASS" in verdicts else "-" if "-" in verdicts else "FAIL"
    def floor(key, what, kernel, whole, limit, sources):
        """Shown, not judged: one side's kernel time alone against the figure its line compares
        it with. Where that ratio is already past the line's limit, no user-space work can pass
        the line in that run (the send, the loopback and the reader's wake-up are the kernel's)."""
        _, text, fig = check(key, "(floor) " + what, kernel, whole, limit, False, sources, " µs")
        return ("info", text, fig)
    def heading(key, rule, subs, combine):
        """A line of several checks: its verdict from theirs (an 'info' one counts for nothing)."""
        fig = {"key": key, "kind": "heading", "combine": "all" if combine is all_of else "any", "subs": [f["key"] for _, _, f in subs]}
        return [(combine([v for v, _, _ in subs if v != "info"]), rule, fig)] + [(v, "    " + t, f) for v, t, f in subs]
    ran = lambda sc, name: "steps" in (sc.get(name) or {})
    out = []

    # 1, 2: the handshake.
    v, t, f = check("1", f"1. handshakes/s >= 1.2x {peer}, 0 failed", g(ours, "connect", "handshakes_per_s"),
                    g(peer_scenarios, "connect", "handshakes_per_s"), 1.2, True, ("chatgw connect", f"{peer} connect"))
    if v != "-":
        failed = g(ours, "connect", "failed")
        v, t = ("FAIL" if failed != 0 else v), f"{t}, {failed} failed"
        f["failed"] = failed
    out.append((v, t, f))
    out.append(check("2", f"2. server CPU per handshake <= 0.75x {peer}", g(ours, "connect", "server_cpu_us_per_handshake"),
                     g(peer_scenarios, "connect", "server_cpu_us_per_handshake"), 0.75, False,
                     ("chatgw connect", f"{peer} connect"), " µs"))
    v, t, f = floor("2.floor", f"chatgw's kernel time alone per handshake against {peer}'s whole",
                    g(ours, "connect", "server_sys_us_per_handshake"), g(peer_scenarios, "connect", "server_cpu_us_per_handshake"),
                    0.75, ("chatgw connect", f"{peer} connect"))
    out.append((v, "    " + t, f))

    # 3: connect + join against the peer's handshake (nchan's room is in its URL). connect-join
    # and connect-join-url are idle runs as large as connect's (20,000) with chatbench's default
    # --concurrency, 256, connect's in-flight count (compared_scenarios): the same load.
    rule = f"connect + join per second >= 1.0x {peer}'s handshakes/s"
    peer_hs = g(peer_scenarios, "connect", "handshakes_per_s")
    # Older results have no connect-join (and a connect-join-url of 10,000): idle's join by message.
    joins = ([("3.frame", "connect-join (connect, hello, join)", "connect-join")] if "connect-join" in ours
             else [("3.idle", "idle (connect, hello, join)", "idle")])
    if "connect-join-url" in ours:
        joins.append(("3.url", "connect-join-url (the room in the URL)", "connect-join-url"))
    subs = [check(key, what, g(ours, name, "setups_per_s"), peer_hs, 1.0, True, (f"chatgw {name}", f"{peer} connect"))
            for key, what, name in joins]
    if len(subs) == 1:
        v, t, f = subs[0]
        out.append((v, f"3. {rule}, {t}", dict(f, rule=f"3. {rule}, {f['rule']}")))
    else:
        out += heading("3", f"3. {rule}, either way of joining", subs, any_of)

    # 4: one room of 18,000 at 2 msg/s (2,000 with --quick: the members as the run had them).
    room = f'one room of {g(ours, "fanout-18k-1room", "params", "members") or 18000:,}, 2 msg/s'
    out.append(check("4", f"4. {room}: p99 <= 0.8x {peer}", g(ours, "fanout-18k-1room", "steps", 0, "latency", "p99_ms"),
                     g(peer_scenarios, "fanout-18k-1room", "steps", 0, "latency", "p99_ms"), 0.8, False,
                     ("chatgw fanout-18k-1room", f"{peer} fanout-18k-1room"), " ms"))

    # 5: CPU per delivery, in one room and in 100 rooms at the same rate; at each one's best
    # step for information (a server that passes higher rates coalesces more there).
    where = ("chatgw fanout-18k-100rooms", f"{peer} fanout-18k-100rooms")
    one = check("5.one", room, g(ours, "fanout-18k-1room", "steps", 0, "server_cpu_us_per_delivery"),
                g(peer_scenarios, "fanout-18k-1room", "steps", 0, "server_cpu_us_per_delivery"), 0.7, False,
                ("chatgw fanout-18k-1room", f"{peer} fanout-18k-1room"), " µs")
    ba, bb = best_step(ours), best_step(peer_scenarios)
    rate = lambda st: f' ({st["rate_msgs_per_s"]:g} msg/s)' if st else ""
    best = check("5.a", "(a) 100 rooms at each one's best passing step (not judged: the rates differ)", ba.get("server_cpu_us_per_delivery"),
                 bb.get("server_cpu_us_per_delivery"), 0.7, False, tuple(w + " passing step" for w in where), " µs", (rate(ba), rate(bb)))
    best = ("info", best[1], best[2])
    passed = lambda sc: {st["rate_msgs_per_s"]: st for st in (g(sc, "fanout-18k-100rooms", "steps") or []) if st.get("pass")}
    pa, pb = passed(ours), passed(peer_scenarios)
    both = max(set(pa) & set(pb), default=None)
    rule = "(b) 100 rooms at the highest rate both passed"
    if both is not None or not (ran(ours, "fanout-18k-100rooms") and ran(peer_scenarios, "fanout-18k-100rooms")):
        same = check("5.b", rule + ("" if both is None else f", {both:g} msg/s"), g(pa.get(both), "server_cpu_us_per_delivery"),
                     g(pb.get(both), "server_cpu_us_per_delivery"), 0.7, False, where, " µs")
    else:
        same = ("FAIL", f"{rule}: no rate that both passed (chatgw passed {sorted(pa) or 'none'}, {peer} {sorted(pb) or 'none'})",
                {"key": "5.b", "kind": "check", "rule": rule, "unit": " µs", "limit": 0.7, "higher": False,
                 "a": None, "b": None, "ratio": None, "value": math.inf})
    same[2].update(rule=rule, rate=both)  # per round: the rate both passed (combine_rounds lists them)
    one_floor = floor("5.one.floor", f"{room}: chatgw's kernel time alone per delivery against {peer}'s whole",
                      g(ours, "fanout-18k-1room", "steps", 0, "server_sys_us_per_delivery"),
                      g(peer_scenarios, "fanout-18k-1room", "steps", 0, "server_cpu_us_per_delivery"), 0.7,
                      ("chatgw fanout-18k-1room", f"{peer} fanout-18k-1room"))
    same_floor = floor("5.b.floor", f"100 rooms (b): chatgw's kernel time alone per delivery against {peer}'s whole",
                       g(pa.get(both), "server_sys_us_per_delivery"), g(pb.get(both), "server_cpu_us_per_delivery"), 0.7, where)
    same_floor[2]["rate"] = both
    out += heading("5", f"5. server CPU per delivery <= 0.7x {peer}, in one room and in 100 rooms (b)",
                   [one, one_floor, best, same, same_floor], all_of)

    # 6: 100 rooms, best passing deliveries/s (0 where a server ran and passed nothing).
    out.append(check("6", f"6. 100 rooms: best passing deliveries/s (p99 <= 50 ms, nothing lost) >= 1.5x {peer}",
                     ba.get("deliveries_per_s", 0 if ran(ours, "fanout-18k-100rooms") else None),
                     bb.get("deliveries_per_s", 0 if ran(peer_scenarios, "fanout-18k-100rooms") else None),
                     1.5, True, where, "", (rate(ba), rate(bb))))

    # 7: idle memory.
    out.append(check("7", f"7. idle memory per connection (PSS) <= 0.2x {peer}", g(ours, "idle", "server_pss_kb_per_connection"),
                     g(peer_scenarios, "idle", "server_pss_kb_per_connection"), 0.2, False,
                     ("chatgw idle", f"{peer} idle"), " KB"))

    # 8: C100K, chatgw alone (read as BENCHMARKS.md's table reads it: joined, hold, PSS).
    rule = f"8. C100K: {C100K:,} joined, 0 failed, nothing closed in the hold, PSS <= {C100K_KB:g} KB per connection"
    c = ours.get("c100k")
    if not c:
        out.append(("-", f"{rule}: not run (no chatgw c100k)", {"key": "8", "kind": "plain"}))
    else:
        held = c.get("hold") or {}
        joined, failed, pss = c.get("joined"), c.get("failed"), c.get("server_pss_kb_per_connection")
        ok = (joined == C100K and failed == 0 and held.get("open_after") == joined and held.get("closed_by_server") == 0
              and pss is not None and pss <= C100K_KB)
        out.append(("PASS" if ok else "FAIL",
                    f'{rule}: {fmt(joined)} joined, {fmt(failed)} failed, {fmt(held.get("open_after"))} open after {fmt(held.get("seconds"))} s '
                    f'({fmt(held.get("closed_by_server"))} closed by the server), {fmt(pss)} KB', {"key": "8", "kind": "plain"}))

    # 9: the load generator's own CPU against the server's, both from chatgw's run.
    subs = [check("9.hs", "per handshake", g(ours, "connect", "client_cpu_us_per_handshake"),
                  g(ours, "connect", "server_cpu_us_per_handshake"), 1 / 3, False, ("chatgw connect",) * 2, " µs"),
            check("9.msg", f"per message received against the server's per delivery, at the 100-room best step{rate(ba)}",
                  ba.get("client_cpu_us_per_message"), ba.get("server_cpu_us_per_delivery"), 1 / 3, False,
                  (where[0] + " passing step",) * 2, " µs")]
    subs[1][2].update(rule="per message received against the server's per delivery, at the 100-room best step",
                      rate=ba.get("rate_msgs_per_s"))
    subs.insert(1, floor("9.hs.floor", "chatbench's kernel time alone per handshake against the server's whole",
                         g(ours, "connect", "client_sys_us_per_handshake"), g(ours, "connect", "server_cpu_us_per_handshake"),
                         1 / 3, ("chatgw connect",) * 2))
    subs.append(floor("9.msg.floor", "chatbench's kernel time alone per message against the server's whole, at that step",
                      ba.get("client_sys_us_per_message"), ba.get("server_cpu_us_per_delivery"), 1 / 3,
                      (where[0] + " passing step",) * 2))
    out += heading("9", "9. the load generator's own CPU <= 1/3 (0.33x) of the server's, in chatgw's run", subs, all_of)
    return out


def median(values):
    """The median (of an even count: the mean of the two middle ones)."""
    return statistics.median(values)


def combine_rounds(rounds):
    """Issue 18's bar over N rounds: rounds is lean_bar_lines' output for each round, in order.
    [(verdict, text)] in lean_bar's shape; a ratio line is judged on the median over the rounds
    of that round's ratio (a round where it did not run counts for nothing), and says that
    median, every round's ratio and the medians of the two figures; line 1's '0 failed' holds in
    every round; a heading's verdict is from its checks' combined ones; a line that is no ratio
    (8, C100K: run once) is the first round's. The lines are those of the round with most."""
    n = len(rounds)
    by_key = [{f["key"]: (v, t, f) for v, t, f in lines} for lines in rounds]
    ref = max(rounds, key=len)
    def ratio_text(f):
        """A round's ratio: '-' where it did not run (or the ratio is none), 'none' where it has no
        figures and failed (5(b): no rate that both passed)."""
        if f is None or f["value"] is None:
            return "-"
        if f["ratio"] is None:
            return "none" if f["a"] is None else "-"
        return f"{f['ratio']:.2f}x"
    combined = {}
    for v, t, f in ref:
        if f["kind"] != "check":
            continue
        per = [r.get(f["key"]) for r in by_key]  # (verdict, text, figures) or None, a round each
        figs = [p[2] if p else None for p in per]
        values = [x["value"] for x in figs if x and x["value"] is not None]
        info = any(p and p[0] == "info" for p in per)
        if not values:
            combined[f["key"]] = ("info" if info else "-", t)
            continue
        med = median(values)
        ok = med >= f["limit"] if f["higher"] else med <= f["limit"]
        indent = t[:len(t) - len(t.lstrip(" "))]
        rule = f["rule"]
        if "rate" in f:
            rates = ["-" if x is None or x["value"] is None else "none" if x.get("rate") is None else f'{x["rate"]:g}' for x in figs]
            rule += f", {' '.join(rates)} msg/s"
        a = [x["a"] for x in figs if x and x["a"] is not None]
        b = [x["b"] for x in figs if x and x["b"] is not None]
        shown = "-" if not math.isfinite(med) else f"{med:.2f}x"
        def raw(xs):
            """The median of a figure, whole where its figures are (as one round prints them)."""
            if not xs:
                return "-"
            m = median(xs)
            return fmt(int(m) if all(isinstance(x, int) for x in xs) and m == int(m) else m)
        text = (f"{indent}{rule}: median {raw(a)}{f['unit']} vs {raw(b)}{f['unit']}"
                f" = median {shown} of {' '.join(ratio_text(x) for x in figs)}")
        if "failed" in f or any(x and "failed" in x for x in figs):
            failed = [x.get("failed") if x and x["value"] is not None else None for x in figs]
            ran_failed = [x for x, y in zip(failed, figs) if y and y["value"] is not None]
            ok = ok and all(x == 0 for x in ran_failed)
            text += ", 0 failed in every round" if all(x == 0 for x in ran_failed) else f", failed {' '.join(fmt(x) for x in failed)}"
        if len(values) < n:
            text += f" ({len(values)} of {n} rounds ran)"
        combined[f["key"]] = ("info" if info else "PASS" if ok else "FAIL", text)
    out = []
    for v, t, f in ref:
        if f["kind"] == "check":
            out.append(combined[f["key"]])
        elif f["kind"] == "heading":
            verdicts = [combined[k][0] for k in f["subs"] if k in combined and combined[k][0] != "info"]
            all_of = "FAIL" if "FAIL" in verdicts else "-" if "-" in verdicts else "PASS"
            any_of = "PASS" if "PASS" in verdicts else "-" if "-" in verdicts else "FAIL"
            out.append((all_of if f["combine"] == "all" else any_of, t))
        else:
            out.append((v, t))
    return out
