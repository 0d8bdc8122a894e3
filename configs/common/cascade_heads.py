"""Cascade Mask R-CNN heads for a ViTDet Mask R-CNN config (three box stages at IoU 0.5 / 0.6 / 0.7, 4conv1fc LN
box heads), as ViTDet's cascade configs have them."""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

STAGES = (((10, 5), 0.5), ((20, 10), 0.6), ((30, 15), 0.7))  # box-regression weights and IoU threshold per stage


def use_cascade_heads(roi_heads):
    """Turn ``model.roi_heads`` (StandardROIHeads) into CascadeROIHeads in place; returns it."""
    for key in ("box_head", "box_predictor", "proposal_matcher"):  # arguments Cascade R-CNN does not take
        roi_heads.pop(key)
    roi_heads.update(
        _target_=CascadeROIHeads,
        box_heads=[
            L(FastRCNNConvFCHead)(input_shape=ShapeSpec(channels=256, height=7, width=7),
                                  conv_dims=[256, 256, 256, 256], fc_dims=[1024], conv_norm="LN")
            for _ in STAGES
        ],
        box_predictors=[
            L(FastRCNNOutputLayers)(input_shape=ShapeSpec(channels=1024), test_score_thresh=0.05,
                                    box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
                                    cls_agnostic_bbox_reg=True, num_classes="${...num_classes}")
            for (w1, w2), _ in STAGES
        ],
        proposal_matchers=[
            L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False) for _, iou in STAGES
        ],
    )
    return roi_heads
