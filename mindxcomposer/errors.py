"""The project's exceptions. Each also derives from the built-in exception a Python user would catch for it,
so `except ValueError` / `except TypeError` / `except OSError` keep working:

- `InputError` (a `ValueError`): an image, video or prompt that cannot be turned into model inputs;
  a missing file is also a `FileNotFoundError`.
- `InvalidArgumentError` (a `ValueError`): an argument of a public method outside what it accepts;
  `ArgumentTypeError` is the same for an argument of the wrong type and is also a `TypeError`.
  Messages name the argument, the value given and what is accepted.
- `ModelLoadError` (an `OSError`, as Hugging Face's loading errors are): a model directory that cannot be
  loaded. Problems with a weight file itself are `weights.CheckpointError`.
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


class InvalidArgumentError(ValueError):
    """An argument of a public method has a value the method does not accept."""


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of a public method has a type the method does not accept (`"4"` or `2.5` for a count,
    a string where a list of images is expected, ...)."""


class InvalidTextError(InputError, InvalidArgumentError):
    """Text that is not valid Unicode: it holds lone surrogates, which is what bytes that were not UTF-8
    become when decoded with `errors="surrogateescape"` (command-line arguments, stdin)."""


class MissingTokenizerError(InvalidArgumentError):
    """A method that needs a tokenizer was called on a model without one (its directory had no
    tokenizer.model) and none was passed."""


class ModelLoadError(OSError):
    """A model directory that cannot be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model directory (or its config.json) does not exist."""


class ConfigError(ModelLoadError, ValueError):
    """config.json is not valid JSON, lacks a key the weights' shapes depend on, or has a bad value."""


class TokenizerLoadError(ModelLoadError):
    """tokenizer.model is missing or is not a SentencePiece model."""


class TokenizerNotFoundError(TokenizerLoadError, ModelNotFoundError):
    """There is no tokenizer.model where one was asked for (also a `FileNotFoundError`)."""
