"""
The Docker plugin's HTTP side: the Klein routes of the volume plugin protocol v1, each
reading dockerd's JSON and answering HTTP 200 with an ``Err`` key whatever happens, and the
unix socket they are served on (``plugin_site``, ``listen_plugin``). The work is the
handlers' (``pyflock.agent._plugin.DockerPlugin``).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import Any, Callable, Optional

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from werkzeug.exceptions import MethodNotAllowed, NotFound as RouteNotFound

from pyflock.agent._plugin_model import BadRequest, PluginError, PluginSocketError
from pyflock.common._client import ControlError
from pyflock.common._logging import log_event

_log = Logger()

#: Largest request body read; dockerd's are a few hundred bytes.
MAX_BODY = 1024 * 1024

CONTENT_TYPE = b"application/vnd.docker.plugins.v1.1+json"


class PluginApp:
    """
    The Klein application of Docker's volume plugin protocol: ``plugin`` handles each
    call's JSON body (``activate``, ``create``, ``remove``, ``mount``, ``unmount``,
    ``path``, ``get``, ``list_volumes``) and returns the answer or fails with a
    ``PluginError``.
    """

    app = Klein()

    def __init__(self, plugin: Any):
        self._plugin = plugin

    def resource(self) -> Resource:
        """The web resource serving the protocol (see ``plugin_site``)."""
        return _DefaultHost(self.app.resource())

    @app.handle_errors(RouteNotFound)
    def _unknown(self, request: Any, failure: Failure) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", CONTENT_TYPE)
        path = request.path.decode("utf-8", "replace")
        return _encode({"Err": f"pyflock: unknown endpoint {path}: this plugin implements "
                               f"/Plugin.Activate and /VolumeDriver.* (volume plugin "
                               f"protocol v1)"})

    @app.handle_errors(MethodNotAllowed)
    def _not_post(self, request: Any, failure: Failure) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"allow", b"POST")
        return _encode({"Err": "pyflock: the plugin protocol uses POST only"})

    @app.route("/Plugin.Activate", methods=["POST"])
    def activate(self, request: Any) -> Deferred:
        """Activate: this plugin implements the volume driver protocol."""
        return self._serve(request, "Plugin.Activate", self._plugin.activate, named=False)

    @app.route("/VolumeDriver.Capabilities", methods=["POST"])
    def capabilities(self, request: Any) -> Deferred:
        """Capabilities: volumes are cluster-wide (scope global)."""
        return self._serve(request, "VolumeDriver.Capabilities",
                           lambda body: {"Capabilities": {"Scope": "global"}}, named=False)

    @app.route("/VolumeDriver.Create", methods=["POST"])
    def create(self, request: Any) -> Deferred:
        """Create: configure a dataset for the volume on this node (idempotent)."""
        return self._serve(request, "VolumeDriver.Create", self._plugin.create)

    @app.route("/VolumeDriver.Remove", methods=["POST"])
    def remove(self, request: Any) -> Deferred:
        """Remove: delete the volume's dataset unless it is in use."""
        return self._serve(request, "VolumeDriver.Remove", self._plugin.remove)

    @app.route("/VolumeDriver.Mount", methods=["POST"])
    def mount(self, request: Any) -> Deferred:
        """Mount: lease, create or move here, wait until mounted, answer the path."""
        return self._serve(request, "VolumeDriver.Mount", self._plugin.mount)

    @app.route("/VolumeDriver.Unmount", methods=["POST"])
    def unmount(self, request: Any) -> Deferred:
        """Unmount: count one mount fewer; the last one releases the lease."""
        return self._serve(request, "VolumeDriver.Unmount", self._plugin.unmount)

    @app.route("/VolumeDriver.Path", methods=["POST"])
    def path(self, request: Any) -> Deferred:
        """Path: where the volume is mounted here, from the agent's view."""
        return self._serve(request, "VolumeDriver.Path", self._plugin.path)

    @app.route("/VolumeDriver.Get", methods=["POST"])
    def get(self, request: Any) -> Deferred:
        """Get: the volume from the agent's view (never asks the control service)."""
        return self._serve(request, "VolumeDriver.Get", self._plugin.get)

    @app.route("/VolumeDriver.List", methods=["POST"])
    def list_volumes(self, request: Any) -> Deferred:
        """List: every named volume in the agent's view."""
        return self._serve(request, "VolumeDriver.List", self._plugin.list_volumes,
                           named=False)

    def _serve(self, request: Any, endpoint: str, handler: Callable[[dict], Any],
               named: bool = True) -> Deferred:
        """Run ``handler(body)`` and answer 200 with its result and ``Err``, whatever
        happens."""
        request.setHeader(b"content-type", CONTENT_TYPE)
        name = None

        def gone(failure: Failure) -> None:
            # Klein cancels the handler; this says why in the log.
            log_event(_log, "pyflock:plugin:caller-gone", LogLevel.warn, endpoint=endpoint,
                      name=name)
        request.notifyFinish().addErrback(gone)
        try:
            body = _read_body(request)
            if named:
                name = body.get("Name")
                if not isinstance(name, str) or not name:
                    raise BadRequest('the request has no volume name: "Name" must be a '
                                     'non-empty string')
            d = maybeDeferred(handler, body)
        except Exception:
            d = Deferred()
            d.errback()

        def answer(result: dict) -> bytes:
            return _encode(dict(result, Err=""))

        def refuse(failure: Failure) -> bytes:
            error = failure.value
            if isinstance(error, PluginError):
                if isinstance(error, BadRequest):
                    log_event(_log, "pyflock:plugin:bad-request", LogLevel.warn,
                              endpoint=endpoint, reason=str(error))
                return _encode({"Err": error.err})
            if isinstance(error, CancelledError):
                return _encode({"Err": "pyflock: the request was cancelled"})
            if isinstance(error, ControlError):
                return _encode({"Err": f"pyflock: {endpoint} of volume {name}: {error}"})
            log_event(_log, "pyflock:plugin:internal-error", LogLevel.critical,
                      endpoint=endpoint, name=name, traceback=failure.getTraceback())
            return _encode({"Err": f"pyflock: internal error in {endpoint} of volume "
                                   f"{name} ({type(error).__name__}); the agent's log has "
                                   f"the details (event pyflock:plugin:internal-error)"})
        return d.addCallbacks(answer, refuse)


def _encode(value: dict) -> bytes:
    return json.dumps(value).encode("utf-8")


def _read_body(request: Any) -> dict:
    """The JSON object of the request (an empty body is ``{}``); ``BadRequest`` if not."""
    content = request.content
    raw = content.read(MAX_BODY + 1) if content is not None else b""
    if len(raw) > MAX_BODY:
        raise BadRequest(f"the request body is larger than {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not "
                         f"{type(body).__name__}")
    return body


class _DefaultHost(Resource):
    """
    Gives requests without a Host header a made-up one: dockerd 20.10 sends an empty Host,
    with which Twisted looks up the unix socket's (missing) host name and fails.
    """

    isLeaf = True

    def __init__(self, wrapped: Resource):
        super().__init__()
        self._wrapped = wrapped

    def render(self, request: Any) -> Any:
        """Render the wrapped resource with a usable Host header."""
        if not request.getHeader(b"host"):
            request.requestHeaders.setRawHeaders(b"host", [b"localhost"])
        return self._wrapped.render(request)


class _PluginSite(Site):
    """A Site without an access log: the plugin logs its own structured events."""

    noisy = False

    def log(self, request: Any) -> None:
        """Do not log each request (events ``pyflock:plugin:*`` say what happened)."""


def plugin_site(plugin: Any) -> Site:
    """The HTTP site serving ``plugin`` (a ``DockerPlugin``; give it to ``listen_plugin``)."""
    site = _PluginSite(plugin.resource())
    site.displayTracebacks = False
    return site


def listen_plugin(reactor: Any, path: str, site: Site) -> Any:
    """
    Serve ``site`` on the unix socket ``path`` (mode 0600; its folder is created if
    missing) and return the listening port; ``stopListening()`` removes the socket. A stale
    socket left by a dead process is replaced; one that a live process serves is not, and
    ``PluginSocketError`` says so. Blocks briefly (a connect to a local socket): call it at
    start, before dockerd needs the plugin.
    """
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, mode=0o755, exist_ok=True)
        existing: Optional[os.stat_result] = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as e:
        raise PluginSocketError(f"cannot serve the Docker plugin at {path}: {e.strerror}"
                                ) from None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise PluginSocketError(f"cannot serve the Docker plugin at {path}: it exists "
                                    f"and is not a socket; remove it or set another "
                                    f"plugin.socket")
        if _socket_is_live(path):
            raise PluginSocketError(f"cannot serve the Docker plugin at {path}: another "
                                    f"process serves it (another pyflock-agent?); stop it "
                                    f"first")
        os.unlink(path)
        log_event(_log, "pyflock:plugin:stale-socket-removed", path=path)
    try:
        port = reactor.listenUNIX(path, site, mode=0o600, wantPID=False)
    except CannotListenError as e:
        raise PluginSocketError(f"cannot serve the Docker plugin at {path}: "
                                f"{e.socketError}") from None
    log_event(_log, "pyflock:plugin:listening", path=path)
    return port


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


__all__ = ["CONTENT_TYPE", "MAX_BODY", "PluginApp", "listen_plugin", "plugin_site"]
