"""Exceptions for inputs the pipeline cannot use.

Every class derives from `InputError`, itself a `ValueError`, so callers can catch bad input generically;
a missing file is also a `FileNotFoundError`.
"""


class InputError(ValueError):
    """An image, video or prompt that cannot be turned into model inputs."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """The image or video path does not exist or is not a file."""


class UnsupportedFormatError(InputError):
    """The file extension is neither an image nor a video extension the pipeline accepts."""


class UnreadableImageError(InputError):
    """The file is not a decodable image (corrupt, truncated, or not an image at all)."""


class EmptyImageError(InputError):
    """The image has no pixels, or its aspect ratio is so extreme that a side would resize to zero."""


class ImageTooLargeError(InputError):
    """The image has more pixels than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`)."""


class UnreadableVideoError(InputError):
    """The video cannot be opened or reports no usable frame rate."""


class EmptyVideoError(InputError):
    """The video decodes to no frames."""


class ImageCountMismatchError(InputError):
    """The number of images differs from the number of `<ImageHere>` markers in the prompt."""
