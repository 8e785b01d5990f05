"""The one exception a request can fail with, shaped as OpenAI's error body.

Everything a client sends that the server cannot serve becomes an `APIError` before any model work starts
(or, for what only the model thread can find out, before the response starts), and the app turns it
into `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status, as OpenAI does.
"""
from typing import Optional


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(message, 400, "invalid_request_error", param, code)
