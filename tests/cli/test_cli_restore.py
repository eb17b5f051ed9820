"""``pyflock destroy`` keeps the data a while, ``pyflock restore`` brings it back, and
``pyflock list --all`` shows until when, against the real REST API in memory."""

from __future__ import annotations

import json

from pyflock.cli._cli import EXIT_FAILED, EXIT_OK
from pyflock.cli._output import utc_text
from tests.cli.test_cli import GONE, NODE_1, WEB, CLITestCase


class RestoreTests(CLITestCase):
    """The recycle bin from the command line."""

    def test_destroy_keeps_data(self):
        """``destroy NAME`` says until when the data is kept and how to restore it."""
        code, out, err = self.cli("destroy", "web")
        until = self.configuration.datasets[WEB].retained_until
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(until, self.harness.clock.seconds() + 3600)
        self.assertEqual(f"Deleted dataset {WEB} (web); its data is kept until "
                         f"{utc_text(until)}: 'pyflock restore {WEB}' brings it back, "
                         f"'pyflock destroy --now {WEB}' destroys it at once.\n", out)

    def test_list_all_shows_when_data_goes(self):
        """``list --all`` shows a kept deleted dataset with the time its data goes."""
        until = self.configuration.datasets[GONE].retained_until
        _, out, _ = self.cli("list", "--all")
        self.assertIn(f"deleted, kept until {utc_text(until)}", out)
        _, out, _ = self.cli("list", "--all", "--json")
        self.assertEqual([until], [d["retained_until"] for d in json.loads(out)
                                   if d["deleted"]])

    def test_restore_by_old_name(self):
        """``restore NAME`` finds the deleted dataset by its former name and restores it."""
        code, out, err = self.cli("restore", "old")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(f"Restored dataset {GONE} (old).\n", out)
        self.assertFalse(self.configuration.datasets[GONE].deleted)

    def test_restore_name_taken(self):
        """Once the name is taken, ``restore`` fails saying so, and ``--name`` restores."""
        self.assertEqual(EXIT_OK, self.cli("create", "--node", NODE_1, "--name", "old")[0])
        self.assertOneLineError(self.cli("restore", GONE), EXIT_FAILED,
                                "The name 'old' is already used")
        code, out, _ = self.cli("restore", "cccc", "--name", "old-2")
        self.assertEqual((EXIT_OK, f"Restored dataset {GONE} (old-2).\n"), (code, out))

    def test_restore_after_purge(self):
        """A dataset destroyed ``--now`` cannot be restored: the service says why."""
        self.assertEqual(EXIT_OK, self.cli("destroy", "--now", GONE)[0])
        self.assertOneLineError(self.cli("restore", GONE), EXIT_FAILED,
                                "no longer kept")

    def test_restore_unknown(self):
        """A name no kept deleted dataset had is refused, pointing at ``pyflock list``."""
        self.assertOneLineError(self.cli("restore", "web"), EXIT_FAILED,
                                "no dataset has the id, id prefix or name 'web'")
