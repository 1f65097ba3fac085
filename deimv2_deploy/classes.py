"""COCO class names in the order of the model's 80 labels (0..79), and the COCO category id of each label.

An 80-class COCO model predicts labels 0..79; the COCO annotation files number the same classes with ids
among 1..90 (ten ids were never used). `COCO_CATEGORY_IDS[label]` is the id, as the official code maps it.
"""

__all__ = ["COCO_CLASSES", "COCO_CATEGORY_IDS"]

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# The ten ids of the 2014 category list that COCO detection never used; the 80 others, ascending, are the labels'.
_UNUSED_COCO_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _UNUSED_COCO_IDS)
