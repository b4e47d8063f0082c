"""Encoders: importing this package registers every mimtrain encoder with timm."""
from mimtrain.encoders import vit  # noqa: F401
from mimtrain.encoders import gcvit, swin  # noqa: F401
from mimtrain.encoders import hivit  # noqa: F401
from mimtrain.encoders import glnet  # noqa: F401
from mimtrain.encoders.base import MIMEncoder, build_encoder, check_image_size  # noqa: F401
from mimtrain.encoders import gpvit  # noqa: F401
from mimtrain.encoders import dgt  # noqa: F401
