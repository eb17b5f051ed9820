"""The CLI given several control service replicas (issue 9): flag, environment, cli.yml."""

from pyflock.cli._cli import EXIT_OK, EXIT_USAGE
from pyflock.cli._settings import Settings, default_client_factory
from tests.cli.test_cli import CLITestCase


class ReplicaSettingsTests(CLITestCase):
    """``--control-service a,b,c``, ``PYFLOCK_CONTROL_SERVICE=a,b,c`` and a cli.yml list."""

    def test_flag(self):
        """A comma-separated flag names every replica, in order, each with the port."""
        code, _, err = self.cli("--control-service", "c1.example, 10.0.0.2,::1",
                                "--control-port", "4600", "version")
        self.assertEqual((EXIT_OK, ""), (code, err))
        [settings] = self.settings
        self.assertEqual(settings.control_services, ("c1.example", "10.0.0.2", "::1"))
        self.assertEqual(settings.base_urls, ("https://c1.example:4600",
                                              "https://10.0.0.2:4600", "https://[::1]:4600"))

    def test_environment(self):
        """``PYFLOCK_CONTROL_SERVICE`` may list the replicas too."""
        self.cli("version", env={"PYFLOCK_CONTROL_SERVICE": "a,b,c", "PYFLOCK_USER": "alice",
                                 "HOME": str(self.home)})
        self.assertEqual(self.settings[0].control_services, ("a", "b", "c"))

    def test_file_list(self):
        """cli.yml may give ``control-service`` as a YAML list."""
        folder = self.home / ".config" / "pyflock"
        folder.mkdir(parents=True)
        (folder / "cli.yml").write_text("control-service: [c1, c2]\nuser: bob\n")
        code, _, _ = self.cli("version", env={"HOME": str(self.home)})
        self.assertEqual(EXIT_OK, code)
        self.assertEqual(self.settings[0].control_services, ("c1", "c2"))

    def test_empty_entry_refused(self):
        """An empty host between commas is refused naming where it came from."""
        self.assertOneLineError(self.cli("--control-service", "a,,b", "list"), EXIT_USAGE,
                                "--control-service: 'a,,b' must be a host, or several "
                                "control service replicas' hosts separated by commas")

    def test_client_of_every_replica(self):
        """The default client factory makes a client of every replica."""
        from twisted.internet.task import Clock
        from tests.harness.certificates import make_cluster_certificates
        make_cluster_certificates(self.home, nodes=0)
        client = default_client_factory(Clock(), timeout=5)(Settings(
            control_service="c1,c2", control_port=4523, certs_path=str(self.home),
            user="alice"))
        self.assertEqual(repr(client), "<ControlClient https://c1:4523 https://c2:4523>")
