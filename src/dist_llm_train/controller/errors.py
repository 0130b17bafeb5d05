"""Domain errors the service raises; the app maps each to one HTTP status with {"detail": message}."""

from __future__ import annotations


class ControllerError(Exception):
    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ControllerError):
    status_code = 404


class Conflict(ControllerError):
    status_code = 409


class BadInput(ControllerError):
    status_code = 422
