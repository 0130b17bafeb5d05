"""The controller's refusals, one class per HTTP status, shared by both ends of the API.

The service raises them and the app answers `status_code` with `{"detail": message}`; the clients in
`controller.client` raise the same classes when the controller answers with an error, so a caller catches
`NotFound` or `Conflict` whichever side of the wire it is on.
"""

from __future__ import annotations


class ControllerError(Exception):
    """A refused request: `status_code` and the controller's one-line `message`."""

    status_code = 400

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:  # a status with no class of its own (401, 413, 503 ...)
            self.status_code = status_code


class Unauthorized(ControllerError):
    """401: no valid credential (missing, foreign, or expired): a worker registers again with its join credential."""

    status_code = 401


class NotFound(ControllerError):
    status_code = 404


class UnknownWorker(NotFound):
    """The controller does not know this worker id (e.g. its state was reset): register again."""


class Conflict(ControllerError):
    status_code = 409


class BadInput(ControllerError):
    status_code = 422
