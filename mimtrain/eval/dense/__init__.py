"""Dense transfer: COCO Mask R-CNN (`detection`) and ADE20K UperNet (`segmentation`) on any encoder through
`backbone` (strides 4-32), run by `engine.fit`."""
