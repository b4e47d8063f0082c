"""Encoders: importing this package registers every mimtrain encoder with timm."""
from . import vit  # noqa: F401
from . import gcvit, swin  # noqa: F401
from . import hivit  # noqa: F401
from . import glnet  # noqa: F401
from .base import MIMEncoder, build_encoder, check_image_size  # noqa: F401
from . import gpvit  # noqa: F401
from . import dgt  # noqa: F401
