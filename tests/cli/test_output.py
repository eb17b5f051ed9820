"""
CLI output is safe (issue 8, point 11): names, addresses and paths from the cluster are
shown with their control and escape characters made visible, and ``pyflock list`` prints
one line per dataset, whatever the metadata.
"""

from __future__ import annotations

import io
import json
import unicodedata

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pyflock.cli._cli import EXIT_OK, run
from pyflock.cli._output import format_table, visible
from pyflock.common._model import Configuration, Dataset
from pyflock.common._records import DatasetReport
from pyflock.control.testing import APIHarness

NODE = "11111111-0000-4000-8000-000000000001"
ENV = {"PYFLOCK_CONTROL_SERVICE": "control.example", "PYFLOCK_USER": "alice",
       "HOME": "/nonexistent"}


def shown_safely(text: str) -> bool:
    """Whether ``text`` holds no character a terminal would obey rather than show (but
    the newlines that end lines)."""
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
                   for c in text.replace("\n", ""))


def test_visible_escapes():
    """Terminal escapes, line breaks, bidirectional overrides, zero-width characters and
    lone surrogates are written as escapes; letters of any script are kept."""
    cases = {
        "\x1b[2J\x1b]0;owned\x07": "\\x1b[2J\\x1b]0;owned\\x07",
        "a\nb\rc\td\x7f\x9b": "a\\x0ab\\x0dc\\x09d\\x7f\\x9b",
        "evil\u202etxt.exe": "evil\\u202etxt.exe",
        "zero\u200bwidth\u2028": "zero\\u200bwidth\\u2028",
        "lone\ud800": "lone\\ud800",
        "tag\U000e0041": "tag\\U000e0041",
        "pgdata": "pgdata",
        "données-über-数据 ☃ 😀": "données-über-数据 ☃ 😀",
    }
    for text, expected in cases.items():
        assert visible(text) == expected


def test_table_rows_stay_one_line():
    """A table with hostile cells keeps one line per row and no escape characters."""
    table = format_table(["NAME", "PATH"], [["a\nb", "\x1b[31mred"], ["c", "/x\r/y"]])
    assert table.count("\n") == 3
    assert shown_safely(table)


_ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=40)


@st.composite
def odd_clusters(draw):
    """A configuration of datasets with any metadata, and a node of any address reporting
    them mounted at any path."""
    datasets = []
    for index in range(draw(st.integers(0, 4))):
        metadata = draw(st.dictionaries(_ANY_TEXT.filter(bool), _ANY_TEXT, max_size=4))
        datasets.append(Dataset(dataset_id=f"aaaaaaaa-0000-4000-8000-{index:012d}",
                                primary=NODE, metadata=metadata,
                                deleted=draw(st.booleans())))
    host = draw(_ANY_TEXT)
    paths = [draw(st.one_of(st.none(), _ANY_TEXT)) for _ in datasets]
    return Configuration.from_records(datasets, [], 1), host, paths


class ListTests(SynchronousTestCase):
    """``pyflock list`` over clusters with odd metadata, addresses and paths."""

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(odd_clusters())
    def test_list_never_crashes(self, cluster):
        """``list``, ``list --all`` and ``list --json`` succeed; tables show one line per
        dataset and nothing a terminal would obey; JSON round-trips the metadata."""
        config, host, paths = cluster
        harness = APIHarness(config=config)
        harness.report_node(NODE, host, [
            DatasetReport(dataset_id=d.dataset_id, state="mounted", path=path)
            for d, path in zip(config.datasets.values(), paths)])
        shown = {}
        for argv in (["list"], ["list", "--all"], ["list", "--json"]):
            stdout, stderr = io.StringIO(), io.StringIO()
            code = self.successResultOf(run(argv, lambda settings: harness.client(),
                                            stdout, stderr, ENV))
            self.assertEqual((code, stderr.getvalue()), (EXIT_OK, ""))
            out = stdout.getvalue()
            out.encode("utf-8")
            shown[argv[-1]] = out
        live = [d for d in config.datasets.values() if not d.deleted]
        self.assertEqual(shown["list"].count("\n"), len(live) + 1)
        self.assertTrue(shown_safely(shown["list"]) and shown_safely(shown["--all"]))
        listed = json.loads(shown["--json"])
        self.assertEqual({d["dataset_id"]: d["metadata"] for d in listed},
                         {d.dataset_id: dict(d.metadata) for d in live})
