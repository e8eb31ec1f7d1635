"""Every error masktune raises for a problem the user can fix, in one place.

Each derives from :class:`MaskTuneError`; its message says what is wrong and how to fix it. The
command line prints that message and exits with code 2.
"""


class MaskTuneError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(MaskTuneError, ValueError):
    """A setting is unknown or has a value that cannot work."""


class DeviceError(MaskTuneError, ValueError):
    """The requested device does not exist or cannot be used."""


class DataError(MaskTuneError, RuntimeError):
    """A dataset is missing, corrupt or misconfigured."""


class CorruptImageError(DataError):
    """An image file cannot be opened or decoded; the message names the file."""


class LayerError(MaskTuneError, ValueError):
    """The CAM layer named by the user does not exist or has no spatial output."""


class WeightsError(MaskTuneError, RuntimeError):
    """Pretrained weights cannot be loaded; the message says where to put them or how to go without."""


class CAMMethodError(MaskTuneError, ValueError):
    """An unknown CAM method, or one whose optional dependency is missing."""


class MaskSetError(MaskTuneError, ValueError):
    """A mask set cannot be read, or does not match the dataset or model it is used with."""


class TrainingError(MaskTuneError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class StorageError(MaskTuneError, RuntimeError):
    """A saved file cannot be read back (damaged, truncated or not what it should be)."""


class RunDirError(MaskTuneError, RuntimeError):
    """The run directory is in use, or holds a run made with other settings."""


class ReportError(MaskTuneError):
    """A run directory cannot be reported on."""
