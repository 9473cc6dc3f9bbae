"""Errors a user can cause by pointing herd at a bad checkpoint; each message names the problem."""


class CheckpointError(ValueError):
    """A checkpoint (config, weights or tokenizer) that cannot be loaded as asked.

    The message is one line that names the file, tensor or field at fault; the CLI prints it
    as is, without a traceback.
    """
