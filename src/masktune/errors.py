"""The exception every user-caused masktune error derives from."""


class MaskTuneError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""
