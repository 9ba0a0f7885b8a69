"""Progress lines: a bar with an ETA where the work is known, rate otherwise; a log (not a
terminal) gets a line at most every 10 s plus the final one, never the same line twice."""

import io
import time

from bigjax import progress


def test_bar_in_a_log_writes_the_first_and_the_final_line_only_when_fast():
    out = io.StringIO()
    bar = progress.Bar("work", 10, "items", stream=out)
    for _ in range(10):
        bar.advance(note="busy")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the final state: not 10 lines
    assert lines[0].startswith("work [##") and " 10% 1/10 items" in lines[0]
    assert "[####################] 100% 10/10 items" in lines[1] and "busy" in lines[1]
    assert "eta" not in lines[1]  # done: no ETA left to show


def test_bar_shows_an_eta_while_unfinished_and_a_count_without_a_total():
    out = io.StringIO()
    bar = progress.Bar("work", 4, "steps", stream=out)
    bar.start -= 2.0  # as if the first step took 2 s
    bar.update(1, force=True)
    assert "25% 1/4 steps" in out.getvalue() and "eta 0:00:06" in out.getvalue()
    out = io.StringIO()
    bar = progress.Bar("read", stream=out)
    bar.update(1234, force=True)
    assert out.getvalue().startswith("read 1,234") and "[" not in out.getvalue()


def test_work_skipped_leaves_the_total_and_its_eta():
    # an eval of eval.num_batches=1,000,000 whose split ended after 27 batches: the bar ends
    # at 27/27 with no eta, not at 0% of a million with an eta of days
    out = io.StringIO()
    bar = progress.Bar("eval", 1_000_000, "batches", stream=out)
    bar.start -= 2.0
    for _ in range(27):
        bar.advance()
    bar.skip(1_000_000 - 27, "the held-out split ended")
    last = out.getvalue().splitlines()[-1]
    assert "100% 27/27 batches" in last and "eta" not in last and "split ended" in last
    two = progress.Bar("compress", 2 * 10 + 2, "steps", stream=io.StringIO())
    two.advance(4)
    two.skip(10 - 4, "ended")  # the first of two evals of 10 batches ended after 4
    assert two.total == 16  # the second eval and the 2 other steps are still to come


def test_waiting_says_how_long_a_single_call_took():
    out = io.StringIO()
    with progress.waiting("compiling", stream=out):
        time.sleep(0.05)
    (line,) = out.getvalue().splitlines()
    assert line.startswith("compiling: done in ") and line.endswith(" s")
