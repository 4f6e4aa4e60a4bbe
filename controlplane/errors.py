"""Meshplane's exceptions. Library errors are translated into these where they enter.

MeshError
├── MeshFileError      a mesh file that cannot be read or is invalid
├── CertificateError   the CA cannot load, issue or sign
│   └── CANotFoundError  there is no CA where one was expected to be loaded
├── AuthError          a caller without a valid credential, or asking for more than it proves
└── ConfigError        bad settings or flags given to a command
"""


class MeshError(Exception):
    """Base of every error Meshplane raises on purpose."""


class MeshFileError(MeshError):
    """A mesh file is unreadable or invalid; the message names file, line and field."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        self.path = path
        self.problem = problem
        self.line = line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")


class CertificateError(MeshError):
    """The mesh CA could not load its root or issue a certificate."""


class CANotFoundError(CertificateError):
    """A command that only uses an existing CA found none in the directory it was given."""


class ConfigError(MeshError):
    """Settings or command-line flags that cannot work together."""


class AuthError(MeshError):
    """A caller that proves no identity (`denied` False: unauthenticated), or asks for something its
    identity does not allow (`denied` True). `reason` is a short stable label for metrics and logs."""

    def __init__(self, message: str, *, reason: str, denied: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.denied = denied
