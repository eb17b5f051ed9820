"""
Where the control service and the certificates are: flags, then ``PYFLOCK_*`` environment
variables, then ``cli.yml``, then defaults; and the client made from them.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import attr
import yaml

from pyflock.cli._parser import (
    _CONFIG_KEYS, DEFAULT_PORT, EXIT_UNREACHABLE, EXIT_USAGE, CLIError,
)

#: Seconds to wait for each answer from the control service.
DEFAULT_TIMEOUT = 30.0

_ENVIRONMENT = {
    "control-service": "PYFLOCK_CONTROL_SERVICE",
    "control-port": "PYFLOCK_CONTROL_PORT",
    "certs-path": "PYFLOCK_CERTS_PATH",
    "user": "PYFLOCK_USER",
}



@attr.s(frozen=True, auto_attribs=True)
class Settings:
    """
    Where the control service and the certificates are, and, for each setting, where its
    value came from (``--user``, ``PYFLOCK_USER``, a cli.yml path or ``default``).
    ``control_service`` is one host, or several replicas' hosts separated by commas.
    """

    control_service: str
    control_port: int
    certs_path: str
    user: str
    origins: Mapping[str, str] = attr.ib(factory=dict, eq=False)

    @property
    def control_services(self) -> tuple[str, ...]:
        """The control service replicas' hosts, in the order given."""
        return tuple(host.strip() for host in self.control_service.split(","))

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The API root of each replica, ``https://HOST:PORT``."""
        return tuple(f"https://[{host}]:{self.control_port}"
                     if ":" in host and not host.startswith("[")
                     else f"https://{host}:{self.control_port}"
                     for host in self.control_services)

    @property
    def base_url(self) -> str:
        """The API root of the first replica."""
        return self.base_urls[0]


def config_file_path(env: Mapping[str, str]) -> Optional[str]:
    """Where ``cli.yml`` is: ``$XDG_CONFIG_HOME/pyflock`` or ``$HOME/.config/pyflock``."""
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "pyflock", "cli.yml")
    home = env.get("HOME", "")
    if home:
        return os.path.join(home, ".config", "pyflock", "cli.yml")
    return None


def _read_config_file(path: str) -> dict[str, Any]:
    """The settings in cli.yml at ``path`` ({} if there is no such file)."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}", EXIT_UNREACHABLE) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise CLIError(f"{path} is not valid YAML{line}: "
                       f"{getattr(e, 'problem', None) or e}", EXIT_UNREACHABLE) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise CLIError(f"{path} must be a YAML mapping with the keys "
                       f"{', '.join(_CONFIG_KEYS)}", EXIT_UNREACHABLE)
    unknown = sorted(str(k) for k in loaded if k not in _CONFIG_KEYS)
    if unknown:
        raise CLIError(f"{path}: unknown key {', '.join(map(repr, unknown))}; the keys are "
                       f"{', '.join(_CONFIG_KEYS)}", EXIT_UNREACHABLE)
    result = {}
    for key, value in loaded.items():
        if value is None:
            continue
        if key == "control-service" and isinstance(value, list) and value and all(
                isinstance(host, str) and host for host in value):
            # issue 9: the replicas, as a YAML list
            value = ",".join(value)
        if isinstance(value, (dict, list, bool)):
            raise CLIError(f"{path}: {key} must be a single value, not {value!r}",
                           EXIT_UNREACHABLE)
        result[key] = str(value)
    if "certs-path" in result:
        # A relative folder in the file means relative to the file, not to wherever
        # the command happens to run.
        result["certs-path"] = os.path.join(os.path.dirname(os.path.abspath(path)),
                                            os.path.expanduser(result["certs-path"]))
    return result


def _port(text: str, origin: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise CLIError(f"{origin}: {text!r} is not a port number (1-65535)", EXIT_USAGE)
    return port


def resolve_settings(flags: Mapping[str, Optional[str]], env: Mapping[str, str]) -> Settings:
    """
    The settings from ``flags`` (keys as in cli.yml, None when not given), else the
    environment, else cli.yml, else the defaults (port 4523, certificates in the current
    folder); ``CLIError`` when the control service or user is given nowhere.
    """
    values: dict[str, str] = {}
    origins: dict[str, str] = {}
    for key in _CONFIG_KEYS:
        if flags.get(key) not in (None, ""):
            values[key], origins[key] = str(flags[key]), f"--{key}"
        elif env.get(_ENVIRONMENT[key]):
            values[key], origins[key] = env[_ENVIRONMENT[key]], _ENVIRONMENT[key]
    path = config_file_path(env)
    if len(values) < len(_CONFIG_KEYS) and path is not None:
        for key, value in _read_config_file(path).items():
            if key not in values:
                values[key], origins[key] = value, path
    shown_path = path or "~/.config/pyflock/cli.yml"
    if "control-service" not in values:
        raise CLIError(
            "no control service given: use --control-service HOST, set "
            f"PYFLOCK_CONTROL_SERVICE, or put 'control-service: HOST' in {shown_path}",
            EXIT_UNREACHABLE)
    if "user" not in values:
        raise CLIError(
            "no API user given: use --user NAME (NAME.crt and NAME.key in the "
            f"certificates folder), set PYFLOCK_USER, or put 'user: NAME' in {shown_path}",
            EXIT_UNREACHABLE)
    hosts = [host.strip() for host in values["control-service"].split(",")]
    if not all(hosts) or any(" " in host for host in hosts):
        raise CLIError(f"{origins['control-service']}: {values['control-service']!r} must be "
                       f"a host, or several control service replicas' hosts separated by "
                       f"commas (a,b,c)", EXIT_USAGE)
    port = DEFAULT_PORT
    if "control-port" in values:
        port = _port(values["control-port"], origins["control-port"])
    else:
        origins["control-port"] = "default"
    if "certs-path" not in values:
        values["certs-path"], origins["certs-path"] = ".", "default"
    return Settings(
        control_service=values["control-service"], control_port=port,
        certs_path=os.path.abspath(os.path.expanduser(values["certs-path"])),
        user=values["user"], origins=origins)


def check_certificates(settings: Settings) -> None:
    """Raise ``CLIError`` saying which file is missing and how to make it, if one is."""
    folder = settings.certs_path
    origin = settings.origins.get("certs-path", "default")
    where = (f"the certificates folder {folder}" if origin != "default"
             else f"the current folder {folder} (no --certs-path, PYFLOCK_CERTS_PATH "
                  "or certs-path in cli.yml)")
    authority = os.path.join(folder, "cluster.crt")
    if not os.path.isfile(authority):
        raise CLIError(
            f"{authority} is missing: {where} needs the cluster's cluster.crt (written by "
            "'pyflock-ca initialize NAME'); copy it there or point --certs-path at the "
            "folder that holds it", EXIT_UNREACHABLE)
    for suffix in ("crt", "key"):
        path = os.path.join(folder, f"{settings.user}.{suffix}")
        if not os.path.isfile(path):
            raise CLIError(
                f"{path} is missing: create the certificate of API user "
                f"'{settings.user}' with 'pyflock-ca create-api-certificate "
                f"{settings.user}' in the folder holding cluster.key, then copy "
                f"{settings.user}.crt and {settings.user}.key into {folder}",
                EXIT_UNREACHABLE)
        if not os.access(path, os.R_OK):
            raise CLIError(f"{path} cannot be read by this user; check its owner and "
                           "permissions", EXIT_UNREACHABLE)


def default_client_factory(reactor: Any, timeout: float = DEFAULT_TIMEOUT
                           ) -> Callable[[Settings], Any]:
    """A factory of ``ControlClient`` speaking mutual TLS with the settings' certificates."""
    def make(settings: Settings) -> Any:
        check_certificates(settings)
        from pyflock.common._client import ControlClient
        from pyflock.common._ca import CertificateError
        from pyflock.common._tls import treq_client
        try:
            http = treq_client(reactor, settings.certs_path, settings.user)
        except CertificateError as e:
            raise CLIError(f"cannot use the certificates: {e}", EXIT_UNREACHABLE) from None
        return ControlClient(http, settings.base_urls, reactor=reactor, timeout=timeout)
    return make

