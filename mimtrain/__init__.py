"""Masked-image-modeling pretraining (MAE, SimMIM) on streaming WebDataset shards.

Importing the package registers every encoder with timm, so `timm.create_model("hivit_base")` works after
`import mimtrain`. Heavy packages (DeepSpeed, pycocotools, transformers) are imported only by the commands that use
them.
"""
from mimtrain import encoders  # noqa: F401
