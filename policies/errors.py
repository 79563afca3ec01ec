"""The one exception tree of `policies/`.

    PolicyError                  anything this package raises on purpose
     ├── ConfigError             config.yaml is invalid; names file, key path and line
     └── RequestError            a client request the policies cannot handle (HTTP 400)
          ├── RequestShapeError  the body is not the shape its endpoint expects
          ├── UnsafePathError    the path could escape a route's base path (.., //, %2f, %2e)
          └── RoutingHeaderError a header a route condition reads has two values

`ConfigError` is raised only at load (start-up, `check-config`, reload); the proxy never
sees one while serving. `RequestError`s carry an OpenAI `param` where one applies, so the
proxy can build its error body from them without parsing the message.
"""

from __future__ import annotations


class PolicyError(Exception):
    """Base of every error raised on purpose by `policies/`."""


class ConfigError(PolicyError):
    """An invalid config. `str()` is `FILE:LINE: KEY.PATH: reason` (parts omitted when unknown).

    The message never contains an interpolated value, so a secret cannot leak into a log.
    """

    def __init__(
        self, reason: str, *, file: str | None = None, key_path: str = "", line: int | None = None
    ) -> None:
        self.reason = reason
        self.file = file
        self.key_path = key_path
        self.line = line
        where = file or "<config>"
        if line is not None:
            where = f"{where}:{line}"
        parts = [where, key_path, reason] if key_path else [where, reason]
        super().__init__(": ".join(parts))


class RequestError(PolicyError):
    """A request the policies cannot handle; the proxy answers HTTP 400."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.message = message
        self.param = param
        super().__init__(message)


class RequestShapeError(RequestError):
    """The body is not what the endpoint expects (e.g. `messages` is not a list)."""


class UnsafePathError(RequestError):
    """A path with `..` or `.` segments, `//`, a backslash, or an encoded `/`, `.` or `\\`."""


class RoutingHeaderError(RequestError):
    """A header a route's condition reads, given more than once with different values:
    which route serves the request would depend on their order."""
