"""What a run prints: bars on a terminal, plain timestamped lines in a log."""
import re

from tensorpoly_jax import console

STAMP = re.compile(r"I\d{4} \d\d:\d\d:\d\d ")


def test_a_log_gets_timestamped_lines_with_progress_rate_and_eta(capsys):
  with console.Progress(10, "pretrain lora", initial=2) as progress:
    progress.advance()  # the rate starts here: a first step's time is mostly its compile
    progress.advance(2)
    progress.report(loss=0.123456)
    progress.advance(5)
    progress.report(loss=0.05)
  out, err = capsys.readouterr()
  first, last = out.splitlines()
  assert STAMP.match(first) and STAMP.match(last)
  assert first[STAMP.match(first).end():].startswith("pretrain lora: step 5/10, loss 0.1235, ")
  assert " steps/s, ETA " in first
  assert last[STAMP.match(last).end():].startswith("pretrain lora: step 10/10, loss 0.05, ")
  assert "ETA" not in last
  assert "\r" not in out + err


def test_an_unknown_total_counts_without_eta(capsys):
  with console.Progress(None, "converting", unit="tensor") as progress:
    progress.advance(3)
    progress.advance(4)
    progress.report()
  line = capsys.readouterr().out
  assert "converting: tensor 7, " in line and "tensors/s" in line and "ETA" not in line


def test_a_terminal_gets_a_bar_and_messages_above_it(monkeypatch, capsys):
  monkeypatch.setattr(console, "interactive", lambda: True)
  with console.Progress(4, "adapt rte s0") as progress:
    progress.advance(4)
    progress.report(loss=1.5)
    console.say("a message")
  out, err = capsys.readouterr()
  assert out == "a message\n"  # no timestamp on a terminal
  assert "adapt rte s0" in err and "4/4" in err and "loss=1.5" in err


def test_each_new_shape_is_announced_once_as_a_compile(capsys):
  calls = []
  step = console.timed_compiles(lambda x: calls.append(x) or len(x), "compiling the step",
                                lambda x: {"batch": (len(x), 2)})
  assert [step([1]), step([2]), step([1, 2]), step([3])] == [1, 1, 2, 1]
  assert calls == [[1], [2], [1, 2], [3]]
  lines = [line[STAMP.match(line).end():] for line in capsys.readouterr().out.splitlines()]
  assert lines[0] == "compiling the step for batch 1x2..."
  assert re.fullmatch(r"compiling the step for batch 1x2: done in \d+\.\d s", lines[1])
  assert lines[2] == "compiling the step for batch 2x2..."
  assert len(lines) == 4


def test_a_first_report_without_a_rate_says_only_the_count(capsys):
  with console.Progress(4, "eval rte", unit="example") as progress:
    progress.advance(4)
    progress.report()
  line = capsys.readouterr().out.strip()
  assert line[STAMP.match(line).end():] == "eval rte: example 4/4"
