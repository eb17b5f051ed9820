"""``pyflock-ca create-control-certificate HOST [HOST...]``: one certificate for every
control service replica (issue 9)."""

import ipaddress

import pytest
from cryptography import x509

from pyflock.common._ca import InvalidName, create_control_certificate
from pyflock.common._ca_script import main
from tests.common.test_ca import ca, extension, load

__all__ = ["ca"]  # the fixture, used by name


def test_every_name_is_a_san(ca):
    """Every name given is a subjectAltName of one certificate, named after the first."""
    folder, _ = ca
    files = create_control_certificate(folder, folder, ["control.example", "c1.example",
                                                        "10.0.0.2"])
    assert files.certificate_path.name == "control-control.example.crt"
    names = extension(load(files.certificate_path), x509.SubjectAlternativeName).value
    assert list(names) == [x509.DNSName("control.example"), x509.DNSName("c1.example"),
                           x509.IPAddress(ipaddress.ip_address("10.0.0.2"))]


def test_repeated_or_no_names_refused(ca):
    """A name given twice, or none, is refused with what was wrong."""
    folder, _ = ca
    with pytest.raises(InvalidName, match="c1 given more than once"):
        create_control_certificate(folder, folder, ["c1", "c2", "c1"])
    with pytest.raises(InvalidName, match="host name or address"):
        create_control_certificate(folder, folder, [])


def test_command_takes_several_hosts(tmp_path, capsys):
    """The command takes several host names and says to install on every replica."""
    assert main(["initialize", "-o", str(tmp_path), "ha"]) == 0
    assert main(["create-control-certificate", "-i", str(tmp_path), "-o", str(tmp_path),
                 "control.example", "c1.example", "c2.example"]) == 0
    assert "on every replica" in capsys.readouterr().out
    names = extension(load(tmp_path / "control-control.example.crt"),
                      x509.SubjectAlternativeName).value
    assert len(list(names)) == 3
