"""Typed errors for bad input.

Serving maps every subclass of :class:`InputError` to a 4xx response with the message as the
reason, so each message must tell a caller what was wrong with *their* bytes.
"""


class InputError(ValueError):
    """Base class: the caller's input cannot be turned into a model input."""

    code: str = "bad_input"


class EmptyInputError(InputError):
    code = "empty"


class NotAnImageError(InputError):
    code = "not_an_image"


class TruncatedImageError(InputError):
    code = "truncated"


class DecompressionBombError(InputError):
    code = "too_many_pixels"


class ImageTooSmallError(InputError):
    code = "too_small"


class UnsupportedImageModeError(InputError):
    code = "unsupported_mode"
