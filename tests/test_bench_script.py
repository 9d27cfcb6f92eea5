"""scripts/bench.py's own logic (the parent process never imports torch): how results become ratios
and the Markdown table, and that every --all case names only options the command line has."""
import argparse
import sys

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def _row(impl, tok_s, rss, wl_mb, loss, **kw):
    return dict(impl=impl, workload="char-eval-long", dtype="fp32", tokens_per_s=tok_s, peak_rss_mb=rss,
                workload_mb=wl_mb, first_loss=loss, n_steps=10, mem_len=1600, mem_dtype="bf16", pattern="dense",
                compile=False, **kw)


def test_compare_gives_txl_over_peer_ratios_and_checks_the_first_loss(bench):
    rows = [_row("txl", 900.0, 500.0, 150.0, 8.1, mems="projected"), _row("peer", 300.0, 1000.0, 600.0, 8.10005)]
    c = bench.compare(rows)
    assert (c["speedup"], c["peak_rss_ratio"], c["workload_mem_ratio"]) == (3.0, 0.5, 0.25)
    assert c["loss_ok"] is True and c["loss_diff"] == pytest.approx(5e-5)
    rows[1]["first_loss"] = 8.2  # unequal numerics in fp32: flagged, and the table says FAIL
    bad = bench.compare(rows)
    assert bad["loss_ok"] is False
    md = bench.to_markdown([(rows, bad)], dict(device="cpu", cpu="X", threads=2, torch="2"))
    line = [ln for ln in md.splitlines() if ln.startswith("| char-eval-long")][0]
    cells = [x.strip() for x in line.strip("|").split("|")]
    header = [x.strip() for x in md.splitlines()[2].strip("|").split("|")]
    assert len(cells) == len(header)
    got = dict(zip(header, cells))
    assert got["speedup"] == "3.0x" and got["txl memory (store)"] == "projected bf16" and got["steps"] == "10"
    assert got["first-loss diff"].endswith("FAIL")
    assert bench.compare(rows[:1]) == {}  # txl alone: no ratios


def test_every_suite_case_overrides_only_known_options(bench):
    """--all runs each SUITE case as the command line with its overrides: a key the parser does not
    have would be silently ignored by run_workload (a case measured with the wrong settings)."""
    base = vars(bench.parser().parse_args([]))
    for wl, dt, over, who in bench.SUITE:
        assert wl in bench.WORKLOADS and dt in bench.DTYPES and who in ("both", "txl")
        unknown = set(over) - set(base)
        assert not unknown, f"SUITE case {wl} {dt} overrides {unknown}, which bench.py has no option for"
        if "mem_dtype" in over:
            assert over["mem_dtype"] in bench.MEM_DTYPES
